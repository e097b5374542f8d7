"""Timestep-uniform calibration data from the full-precision sampler, and the calibration loop.

Q-Diffusion (Sec. 4.1, "time step-aware calibration data sampling"): activation distributions of a diffusion
UNet change across denoising steps, so calibrating on one step (or on training images) misfits the others.
The calibration set is therefore the FP sampler's own intermediate inputs ``x_t`` taken at ``K`` steps spread
uniformly over the whole trajectory of ``S`` steps, first and last step included (the paper: every 5th of 100
DDIM steps, ``K = 20``, which never sees the last 4 steps; kept as strategy ``"q_diffusion"``).

:func:`collect_calibration_data` runs the sampler itself (seeded, on a private copy of the scheduler) and
records the UNet inputs at the selected steps; :func:`calibrate` feeds a prepared model batch by batch,
grouped by timestep, while publishing ``t`` through :func:`~qdiff_ao.observers.timestep_context.timestep_context`.

Example:
    >>> select_step_indices(100, 20, "uniform")[-3:], select_step_indices(100, 20, "q_diffusion")[-3:]
    ([89, 94, 99], [85, 90, 95])
    >>> select_step_indices(10, 3, "last")
    [7, 8, 9]
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from qdiff_ao.calibration._plan import (
    SamplerPlan,
    check_collect_args,
    plan_sampler,
)
from qdiff_ao.calibration.calibration_set import CalibrationSet
from qdiff_ao.calibration.distributed import chunk_seed, init_from_environment, rank_and_world
from qdiff_ao.calibration.observation import calibrate

__all__ = ["STRATEGIES", "select_step_indices", "collect_calibration_data", "calibrate"]

logger = logging.getLogger(__name__)

STRATEGIES = ("uniform", "q_diffusion", "first", "last")


def select_step_indices(num_steps: int, num_timesteps: int, strategy: str = "uniform") -> list[int]:
    """Indices (0 = first, noisiest sampler step) of the steps whose UNet inputs are recorded.

    With ``S = num_steps`` sampler steps and ``K = num_timesteps``:

    * ``"uniform"`` (default): ``i_k = floor(k (S - 1) / (K - 1) + 1/2)`` for ``k = 0..K-1``: evenly spread
      over the whole trajectory *including its last step* (S=100, K=20 gives 0, 5, 10, 16, ..., 94, 99). The
      last step (t near 0) is where the input holds the least noise and quantization hurts most (an 8-bit grid
      set by the noisy steps cannot resolve it); the float fallback and the output correction must see it;
    * ``"q_diffusion"``: ``i_k = floor(k * S / K)``, every ``S/K``-th step starting at the first one (Q-Diffusion,
      Sec. 4.1: S=100, K=20 gives 0, 5, ..., 95: the last S/K - 1 steps are never seen);
    * ``"first"``: ``0..K-1`` (the noisiest steps only);
    * ``"last"``: ``S-K..S-1`` (the cleanest steps only), the two ablations of the paper's Fig. 4.

    Raises:
        ValueError: if ``strategy`` is unknown or ``not 1 <= num_timesteps <= num_steps``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not 1 <= num_timesteps <= num_steps:
        raise ValueError(
            f"num_timesteps={num_timesteps} must be in [1, {num_steps}] (the sampler has {num_steps} steps); "
            "lower num_timesteps or raise num_inference_steps"
        )
    if strategy == "first":
        return list(range(num_timesteps))
    if strategy == "last":
        return list(range(num_steps - num_timesteps, num_steps))
    if strategy == "q_diffusion":
        return [k * num_steps // num_timesteps for k in range(num_timesteps)]
    if num_timesteps == 1:
        return [0]
    return [(2 * k * (num_steps - 1) + num_timesteps - 1) // (2 * (num_timesteps - 1)) for k in range(num_timesteps)]


def collect_calibration_data(
    model: Any,
    scheduler: Any = None,
    *,
    num_inference_steps: int = 100,
    num_timesteps: int = 20,
    samples_per_timestep: int = 256,
    strategy: str = "uniform",
    batch_size: int = 64,
    seed: int = 0,
    prompts: str | list[str] | None = None,
    guidance_scale: float = 7.5,
    negative_prompt: str | list[str] | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    negative_encoder_hidden_states: torch.Tensor | None = None,
    class_labels: torch.Tensor | None = None,
    sample_shape: tuple[int, ...] | None = None,
    max_memory_bytes: int = 2**31,
    progress: bool = True,
    keep_shards: bool = False,
    record_float_output: bool = True,
) -> CalibrationSet:
    """Run the FP sampler and record the UNet inputs ``(x_t, t[, cond])`` at timestep-uniform steps.

    For each chunk ``c`` of the ``ceil(samples_per_timestep / batch_size)`` chunks: draw noise
    ``x_T = init_noise_sigma * N(0, I)`` from a generator seeded ``seed + c * 2**32`` (chunk 0: ``seed``), run
    the scheduler's steps under ``torch.no_grad``, and at each selected step ``i`` (see
    :func:`select_step_indices`) record ``x_in = scheduler.scale_model_input(x_t, t_i)``, i.e. exactly what the
    UNet receives. With classifier-free guidance (conditional UNet and ``guidance_scale > 1``)
    the model input is ``[x_in; x_in]`` with ``[uncond; cond]`` embeddings and the update uses
    ``eps = eps_u + guidance_scale * (eps_c - eps_u)``; both halves are recorded, so each selected step holds
    ``2 * samples_per_timestep`` rows. Sample ``j`` uses conditioning row ``j mod P`` (P prompts / classes).
    Sampling stops after the last selected step. The UNet's own output on every recorded row is kept too
    (``float_output``, before the guidance combination): the passes that compare with the float model read it
    instead of running the model again (one more forward per chunk, at the last selected step).

    Args:
        model: a diffusers UNet (``UNet2DModel``/``UNet2DConditionModel``) or a diffusers pipeline holding
            ``unet`` and ``scheduler`` (and, for ``prompts``, ``encode_prompt`` or tokenizer + text encoder).
        scheduler: any diffusers scheduler; defaults to ``model.scheduler`` for pipelines. It is copied via
            ``type(scheduler).from_config(scheduler.config)``; the caller's scheduler is never stepped.
        num_inference_steps: argument of ``scheduler.set_timesteps``; the number of sampler steps ``S`` is
            ``len(scheduler.timesteps)``, which can differ (PNDM adds Runge-Kutta warm-up steps).
        num_timesteps: how many steps ``K`` to record, ``1 <= K <= S``.
        samples_per_timestep: sampler trajectories, i.e. rows recorded per selected step (x2 with guidance).
        strategy: ``"uniform"`` (Q-Diffusion), ``"first"`` or ``"last"``; see :func:`select_step_indices`.
        batch_size: trajectories run together in one chunk.
        seed: seed of the ``torch.Generator`` drawing all noise; the same seed gives a bit-identical set.
        prompts: text prompts (pipelines with a text encoder only).
        guidance_scale: classifier-free guidance weight for conditional UNets; ``<= 1`` disables guidance.
        negative_prompt: prompt(s) for the unconditional half (default: the empty prompt).
        encoder_hidden_states: conditioning ``[P, L, D]`` to use instead of ``prompts``.
        negative_encoder_hidden_states: unconditional embeddings ``[1 or P, L, D]``; required with
            ``encoder_hidden_states`` when ``guidance_scale > 1``.
        class_labels: class labels ``[P, ...]`` for class-conditional UNets.
        sample_shape: ``(C, H, W)`` of ``x_t``; defaults to ``(config.in_channels, *config.sample_size)``.
        max_memory_bytes: refuse (before sampling) if the set would take more bytes than this.
        progress: show a tqdm bar (rank 0 only under torch.distributed).
        keep_shards: under a process group of N > 1 ranks, keep on each rank only the rows it sampled (its
            chunks of ``batch_size`` trajectories, ``metadata["shard"] = "rank/N"``) instead of gathering the
            whole set on every rank. Without a process group it changes nothing.
        record_float_output: keep the UNet's outputs (``CalibrationSet.float_output``; skipped with a warning
            when they alone would take the set past ``max_memory_bytes``, or the UNet's config has no
            ``out_channels``).

    Under torch.distributed (an initialised group, or torchrun's environment), chunk ``c`` of ``batch_size``
    trajectories runs on rank ``c mod N`` with its own seeded generator and the rows are then shared, so every
    rank holds the single-process set row for row (see :mod:`qdiff_ao.calibration.distributed`).

    Returns:
        The :class:`CalibrationSet`, rows ordered by step, then trajectory.

    Raises:
        TypeError: if ``model`` or ``scheduler`` is not what diffusers provides.
        ValueError: on bad counts/strategy, UNet/scheduler/conditioning mismatches, a set larger than
            ``max_memory_bytes``, or NaN/Inf produced by the sampler (the message names the step).
    """
    check_collect_args(
        num_inference_steps, num_timesteps, samples_per_timestep, batch_size, seed, guidance_scale, max_memory_bytes
    )
    plan = plan_sampler(
        model,
        scheduler,
        num_inference_steps=num_inference_steps,
        prompts=prompts,
        guidance_scale=guidance_scale,
        negative_prompt=negative_prompt,
        encoder_hidden_states=encoder_hidden_states,
        negative_encoder_hidden_states=negative_encoder_hidden_states,
        class_labels=class_labels,
        sample_shape=sample_shape,
    )
    num_steps = len(plan.timesteps)
    if num_timesteps > num_steps:
        raise ValueError(
            f"num_timesteps={num_timesteps} exceeds the {num_steps} steps of {plan.scheduler_name} with "
            f"num_inference_steps={num_inference_steps}; lower num_timesteps or raise num_inference_steps"
        )
    indices = select_step_indices(num_steps, num_timesteps, strategy)
    rows_per_step = samples_per_timestep * plan.rows_per_trajectory
    num_rows = num_timesteps * rows_per_step
    needed = num_rows * plan.bytes_per_row
    output_shape = _output_shape(plan) if record_float_output else None
    output_bytes = num_rows * math.prod(output_shape) * plan.dtype.itemsize if output_shape is not None else 0
    if output_shape is not None and needed <= max_memory_bytes < needed + output_bytes:
        logger.warning("the float outputs would take the calibration set past max_memory_bytes=%s: not recorded "
                       "(the passes run the float model instead)", f"{max_memory_bytes:,}")
        output_shape = None
    if needed > max_memory_bytes:
        raise ValueError(
            f"the calibration set would need {needed:,} bytes ({num_rows:,} rows x {plan.bytes_per_row:,} "
            f"bytes) but max_memory_bytes={max_memory_bytes:,}; lower samples_per_timestep or num_timesteps, "
            "or raise max_memory_bytes"
        )
    init_from_environment()
    rank, world = rank_and_world()
    store = _allocate(plan, num_rows, output_shape)
    _run_sampler(plan, store, indices, samples_per_timestep, batch_size, seed, progress and rank == 0)
    own_rows = None
    if world > 1:
        chunks = _chunk_rows(indices, samples_per_timestep, batch_size, plan.rows_per_trajectory)
        if keep_shards and len(chunks) < world:
            raise ValueError(f"keep_shards with {world} ranks needs >= {world} chunks of trajectories, got "
                             f"{len(chunks)} (samples_per_timestep={samples_per_timestep}, batch_size={batch_size}); "
                             "lower batch_size or gather the set (keep_shards=False)")
        own_rows = _share_rows(store, chunks, keep_shards)
    metadata = {
        "strategy": strategy,
        "scheduler": plan.scheduler_name,
        "seed": seed,
        "num_inference_steps": num_inference_steps,
        "num_scheduler_steps": num_steps,
        "num_timesteps": num_timesteps,
        "samples_per_timestep": samples_per_timestep,
        "step_indices": json.dumps(indices),
        "guidance_scale": plan.guidance_scale if plan.cfg else "none",
    }
    if own_rows is not None:
        metadata["shard"] = f"{rank}/{world}"
        store = {name: value[own_rows] for name, value in store.items()}
    calib = CalibrationSet(metadata={k: str(v) for k, v in metadata.items()}, **store)
    logger.info("collected %r (steps %s of %d)", calib, indices, num_steps)
    return calib


def _output_shape(plan: SamplerPlan) -> tuple[int, ...] | None:
    """Shape of one UNet output row, ``(out_channels, *spatial)`` from the UNet's config (``None``: unknown)."""
    channels = getattr(getattr(plan.unet, "config", None), "out_channels", None)
    if isinstance(channels, bool) or not isinstance(channels, int):
        return None
    return (channels, *plan.sample_shape[1:])


def _allocate(plan: SamplerPlan, num_rows: int, output_shape: tuple[int, ...] | None) -> dict[str, torch.Tensor]:
    store = {
        "sample": torch.empty((num_rows, *plan.sample_shape), dtype=plan.dtype),
        "timestep": torch.empty(num_rows, dtype=plan.timesteps.dtype),
        "step_index": torch.empty(num_rows, dtype=torch.int64),
    }
    if plan.cond is not None:
        store["encoder_hidden_states"] = torch.empty((num_rows, *plan.cond.shape[1:]), dtype=plan.cond.dtype)
    if plan.class_labels is not None:
        labels = plan.class_labels
        store["class_labels"] = torch.empty((num_rows, *labels.shape[1:]), dtype=labels.dtype)
    if plan.cfg:
        store["guidance_pair"] = torch.empty(num_rows, dtype=torch.int64)
    if output_shape is not None:
        store["float_output"] = torch.empty((num_rows, *output_shape), dtype=plan.dtype)
    return store


def _check_finite(x: torch.Tensor, what: str, plan: SamplerPlan, i: int, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"{what} contains NaN/Inf at sampler step index {i} (timestep {t.item()}) with "
            f"{plan.scheduler_name}; check the UNet weights and dtype (fp16 overflow: use float32) and that "
            "the scheduler matches the model"
        )


def _run_sampler(
    plan: SamplerPlan,
    store: dict[str, torch.Tensor],
    indices: list[int],
    samples_per_timestep: int,
    batch_size: int,
    seed: int,
    progress: bool,
) -> None:
    """Run the sampler chunk by chunk and fill ``store`` in place.

    The model batch of the chunk starting at trajectory ``o`` (``f * size`` rows, ``f`` = 2 with guidance) at
    selected step ``indices[p]`` goes to rows ``p * R + f * o`` onwards, ``R = f * samples_per_timestep``.
    """
    rank, world = rank_and_world()
    position = {step: p for p, step in enumerate(indices)}
    last = indices[-1]
    chunk_rows = _chunk_rows(indices, samples_per_timestep, batch_size, plan.rows_per_trajectory)
    num_chunks = len(chunk_rows)
    takes_generator = "generator" in inspect.signature(plan.scheduler.step).parameters
    mine = [c for c in range(num_chunks) if c % world == rank]
    bar = tqdm(total=len(mine) * (last + 1), disable=not progress, desc="calibration data", unit="step")
    with torch.no_grad(), bar:
        for chunk in mine:
            offset = chunk * batch_size
            size = min(batch_size, samples_per_timestep - offset)
            # one generator per chunk: a chunk's noise does not depend on which rank runs it, or after what
            generator = torch.Generator(device="cpu").manual_seed(chunk_seed(seed, chunk))
            step_kwargs = {"generator": generator} if takes_generator else {}
            scheduler = plan.fresh_scheduler()
            noise = torch.randn((size, *plan.sample_shape), generator=generator, dtype=torch.float32)
            x = noise.to(plan.device, plan.dtype) * scheduler.init_noise_sigma
            extra = plan.unet_kwargs(offset, size)
            for i, t in enumerate(scheduler.timesteps):
                model_in = torch.cat([x, x]) if plan.cfg else x
                model_in = scheduler.scale_model_input(model_in, t)
                t_vec = t.reshape(1).repeat(model_in.shape[0])
                if i in position:
                    _check_finite(model_in, "the sampler's x_t", plan, i, t)
                    rows = chunk_rows[chunk][position[i]]
                    store["sample"][rows] = model_in.cpu()
                    store["timestep"][rows] = t_vec.cpu()
                    store["step_index"][rows] = i
                    if plan.cfg:  # pair k = trajectory (offset + j) at selected step p: -k uncond, +k cond
                        pair = position[i] * samples_per_timestep + offset + torch.arange(1, size + 1)
                        store["guidance_pair"][rows] = torch.cat([-pair, pair])
                    for name, value in extra.items():
                        store[name][rows] = value.cpu()
                if i == last and "float_output" not in store:
                    bar.update(1)
                    break
                out = plan.unet(sample=model_in, timestep=t_vec, **extra, return_dict=False)[0]
                _check_finite(out, "the UNet output", plan, i, t)
                if i in position and "float_output" in store:
                    _record_output(store["float_output"], chunk_rows[chunk][position[i]], out)
                if i == last:
                    bar.update(1)
                    break
                if plan.cfg:
                    uncond, cond = out.chunk(2)
                    out = uncond + plan.guidance_scale * (cond - uncond)
                x = scheduler.step(out, t, x, **step_kwargs, return_dict=False)[0]
                _check_finite(x, "the scheduler's next sample", plan, i, t)
                bar.update(1)


def _record_output(store: torch.Tensor, rows: slice, out: torch.Tensor) -> None:
    if tuple(out.shape[1:]) != tuple(store.shape[1:]):
        raise ValueError(f"the UNet's output rows have shape {tuple(out.shape[1:])}, not (config.out_channels, "
                         f"*sample spatial) = {tuple(store.shape[1:])}; collect with record_float_output=False")
    store[rows] = out.to(store.dtype).cpu()


def _chunk_rows(indices: list[int], samples_per_timestep: int, batch_size: int, factor: int) -> list[list[slice]]:
    """Per chunk, the row slices it fills (one per selected step; layout of :func:`_run_sampler`)."""
    rows_per_step = samples_per_timestep * factor
    out = []
    for offset in range(0, samples_per_timestep, batch_size):
        size = min(batch_size, samples_per_timestep - offset)
        out.append([slice(p * rows_per_step + factor * offset, p * rows_per_step + factor * (offset + size))
                    for p in range(len(indices))])
    return out


def _share_rows(store: dict[str, torch.Tensor], chunks: list[list[slice]], keep_shards: bool) -> None | torch.Tensor:
    """Give every rank every chunk's rows (broadcast from the chunk's rank, an exact copy), or, with
    ``keep_shards``, return the indices of this rank's own rows."""
    rank, world = rank_and_world()
    if keep_shards:
        own = [torch.arange(sl.start, sl.stop) for c, slices in enumerate(chunks) if c % world == rank
               for sl in slices]
        return torch.cat(own) if own else torch.zeros(0, dtype=torch.int64)
    for c, slices in enumerate(chunks):
        for sl in slices:
            for name in sorted(store):
                view = store[name][sl]  # rows are the first dimension: a contiguous block
                dist.broadcast(view, src=c % world)
    return None
