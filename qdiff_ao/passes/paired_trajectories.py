"""Paired evidence from sampler runs that start from the same noise: is one run's cost really lower than another's?

The sampler is deterministic (DDIM, eta 0), so trajectory ``j`` of two runs from the same noise differs only by the
denoisers. Per-trajectory costs ``a_j`` and ``b_j`` (e.g. a sample's distance to its float twin) are therefore
paired, and the comparison of two runs is a paired test over ``N`` trajectories rather than a comparison of two
means, each dominated by the few trajectories that end on another image. Two tests, each used by one decision:

* :func:`paired_z` (the denoised-spread correction's harm check, ``passes.prediction_spread``): with
  ``d_j = b_j - a_j``,

      z = mean(d) / (std(d) / sqrt(N))          (one-sided: z > 2 is evidence that b costs more, ~2.3%)

* :func:`switch_confidence` (the reconstruction choice, ``passes.reconstruction_choice``): the share of paired
  bootstrap resamples of the ``N`` trajectories (the same indices for both runs) in which ``mean(b) < mean(a)``.

Why two: the harm check asks for evidence against keeping a correction, where a normal approximation of the mean
difference is enough and gives a continuous ``z`` for the report; the choice asks how often the trajectories
prefer another run, where the bootstrap makes no assumption about the heavy-tailed distances. Both are kept as
their decisions were measured (the modules' docstrings).
"""

from __future__ import annotations

import torch

__all__ = ["paired_z", "switch_confidence"]


def _check_paired(costs_a: torch.Tensor, costs_b: torch.Tensor, minimum: int) -> None:
    if costs_a.dim() != 1 or costs_a.shape != costs_b.shape or costs_a.numel() < minimum:
        raise ValueError(f"costs_a and costs_b must hold one cost per trajectory each (1-D, equal length, at least "
                         f"{minimum}), got shapes {tuple(costs_a.shape)} and {tuple(costs_b.shape)}")


def paired_z(costs_a: torch.Tensor, costs_b: torch.Tensor) -> tuple[float, float]:
    """``(mean(d), z)`` of the module docstring for ``d_j = costs_b[j] - costs_a[j]`` (float64), with ``std(d)``
    (unbiased) floored at ``1e-12`` of ``mean(a) + mean(b)``: ``z`` stays finite (the strict-JSON reports need it)
    and is huge when every ``d_j`` is the same nonzero value. No difference at all gives ``(0, 0)``."""
    _check_paired(costs_a, costs_b, 2)
    a, b = costs_a.double(), costs_b.double()
    d = b - a
    floor = 1e-12 * float(a.mean() + b.mean()) + 1e-300
    mean, std = float(d.mean()), max(float(d.std(unbiased=True)), floor)
    return mean, mean / (std / d.numel() ** 0.5)


def switch_confidence(costs_a: torch.Tensor, costs_b: torch.Tensor, *, resamples: int = 2000, seed: int = 0) -> float:
    """How sure the trajectories are that B is better than A: the share of paired bootstrap resamples of the ``N``
    trajectories (the same indices for A and B, since both ran from the same noise) in which
    ``mean(costs_b) < mean(costs_a)``; costs are per trajectory, lower is better (e.g. ``sample_distance``).

    Why: with ``N`` = 64 trajectories two runs that sample alike get means a few hundredths apart by chance;
    switching on such a difference only trades one random draw for another.
    """
    _check_paired(costs_a, costs_b, 1)
    n = costs_a.numel()
    idx = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    better = costs_b.double()[idx].mean(1) < costs_a.double()[idx].mean(1)
    return float(better.double().mean())
