"""The paired tests over trajectories from the same noise (qdiff_ao.passes.paired_trajectories)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qdiff_ao.passes.paired_trajectories import paired_z, switch_confidence


@settings(max_examples=80, deadline=None)
@given(n=st.integers(2, 64), seed=st.integers(0, 2**16), shift=st.floats(-1.0, 1.0))
def test_paired_z_is_the_paired_t_statistic_and_flips_with_the_order(n: int, seed: int, shift: float) -> None:
    """``z`` equals the textbook paired statistic ``mean(d) / (s_d / sqrt(n))`` (computed here with numpy's
    ``ddof=1`` standard deviation); reading the pair the other way round negates both numbers exactly."""
    rng = np.random.default_rng(seed)
    a = rng.gamma(2.0, 1.0, n)
    b = a * (1.0 + shift * 0.1) + rng.normal(0.0, 0.2, n)
    d = b - a
    expected = d.mean() / (d.std(ddof=1) / math.sqrt(n))
    mean, z = paired_z(torch.from_numpy(a), torch.from_numpy(b))
    assert mean == pytest.approx(d.mean(), rel=1e-9, abs=1e-12)
    assert z == pytest.approx(expected, rel=1e-9)
    back_mean, back_z = paired_z(torch.from_numpy(b), torch.from_numpy(a))
    assert back_mean == -mean and back_z == -z


def test_paired_z_without_a_difference_or_with_a_constant_one() -> None:
    """No difference: no evidence either way. Every trajectory one unit costlier: a zero scatter, where the floored
    std keeps ``z`` finite (the reports are strict JSON) and overwhelming."""
    a = torch.linspace(1.0, 2.0, 16, dtype=torch.float64)
    assert paired_z(a, a.clone()) == (0.0, 0.0)
    mean, z = paired_z(a, a + 1.0)
    assert mean == pytest.approx(1.0) and math.isfinite(z) and z > 1e6


@pytest.mark.parametrize("a, b", [(torch.ones(1), torch.ones(1)), (torch.ones(4), torch.ones(3)),
                                  (torch.ones(2, 2), torch.ones(2, 2))])
def test_paired_tests_refuse_costs_that_are_not_one_per_trajectory(a: torch.Tensor, b: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="one cost per trajectory"):
        paired_z(a, b)
    if a.numel() > 1:  # the bootstrap takes a single trajectory; it too wants 1-D costs of equal length
        with pytest.raises(ValueError, match="one cost per trajectory"):
            switch_confidence(a, b)
