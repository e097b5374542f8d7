"""BRECQ-style block reconstruction with AdaRound weights and learned activation step sizes (Q-Diffusion Sec. 4.3).

Round-to-nearest is not the best rounding of a layer's weights once their effect on the output is counted.
This pass, between calibration and ``convert``, walks the UNet block by block (ResnetBlock2D, transformer
block, attention, or a single layer; see ``blocks``) and for each block

    1. caches its inputs from the model quantized so far and its full-precision outputs ("asym"),
    2. learns AdaRound's rounding of every weight of the block on the Lp output error (``training``),
    3. with quantized activations, learns the step sizes of the block's activation quantizers,

on a fake-quant simulation that shares the prepared model's modules (``qdiff_ao.quantizers.simulation``). Finally
it bakes the result into the prepared graph so that ``convert`` reproduces it exactly:

    weights      W <- (clamp(floor(W / s) + [h(V) >= 1/2] + z, quant_min, quant_max) - z) * s   (grid values)
                 module.qconfig.weight <- FrozenObserver(s, z)   (convert re-rounds to nearest: same codes)
    activations  activation_post_process_k <- FrozenObserver(learned s, z)

    prepared ──calibrate──► observers ──reconstruct──► baked weights + frozen qparams ──convert──► int8 model

Example:
    >>> import torch, qdiff_ao
    >>> from diffusers import UNet2DModel
    >>> from qdiff_ao.capture.graph_state import graph_info
    >>> from qdiff_ao.passes import reconstruct
    >>> _ = torch.manual_seed(0)
    >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
    ...                    norm_num_groups=4, layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
    ...                    up_block_types=("UpBlock2D",) * 2).eval()
    >>> calib = qdiff_ao.CalibrationSet(torch.randn(8, 1, 8, 8), torch.tensor([900] * 4 + [100] * 4))
    >>> prepared = qdiff_ao.prepare(unet, qdiff_ao.QuantConfig(weight_bits=4, act_bits=8), calib.example_inputs(2))
    >>> qdiff_ao.calibrate(prepared, calib, progress=False)
    >>> rcfg = qdiff_ao.ReconstructionConfig(weight_iters=4, act_iters=2, batch_size=4)
    >>> report = graph_info(reconstruct(prepared, calib, rcfg, model=unet, progress=False)).reconstruction
    >>> report["blocks"]["down_blocks.0.resnets.0"]["kind"], report["num_samples"]
    ('resnet', 8)
    >>> qdiff_ao.convert(prepared)(**calib.example_inputs(2)).shape
    torch.Size([2, 1, 8, 8])
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from typing import Any, cast

import torch
from torch import fx, nn
from tqdm import tqdm

from qdiff_ao._compat import ObserverBase, QConfig
from qdiff_ao.calibration.calibration_set import CalibrationSet
from qdiff_ao.calibration.distributed import rank_and_world
from qdiff_ao.calibration.sampler_view import guidance_pairs, guidance_scale
from qdiff_ao.capture.devices import module_device
from qdiff_ao.capture.graph_state import graph_info, has_graph_info, update_graph_info
from qdiff_ao.config import QuantConfig, ReconstructionConfig
from qdiff_ao.observers.frozen import FrozenObserver
from qdiff_ao.passes.reconstruction.blocks import BlockSpec, Partition, compile_block
from qdiff_ao.passes.reconstruction.cache import Frontier, Step, plan_cache
from qdiff_ao.passes.reconstruction.data_parallel import rows_to_cache
from qdiff_ao.passes.reconstruction.resume_state import ReconstructionState, run_fingerprint
from qdiff_ao.passes.reconstruction.training import BlockErrors, BlockTrainer, evaluate_block
from qdiff_ao.quantizers.adaround import LearnedStepQuant
from qdiff_ao.quantizers.simulation import Simulation, build_simulation

__all__ = ["module_types_of", "reconstruct"]

logger = logging.getLogger(__name__)

_INPUT_SOURCES = ("sample", "timestep", "encoder_hidden_states", "class_labels")


def module_types_of(model: nn.Module) -> dict[str, type]:
    """{qualified name: class} of every submodule of ``model`` (what block discovery needs)."""
    return {name: type(m) for name, m in model.named_modules()}


def _resolve_module_types(
    prepared: fx.GraphModule, model: nn.Module | None, module_types: Mapping[str, Any] | None
) -> Mapping[str, Any]:
    if module_types is not None:
        return module_types
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be the original diffusers UNet (an nn.Module), got {type(model).__name__}")
        return module_types_of(model)
    if has_graph_info(prepared) and graph_info(prepared).module_types:
        return graph_info(prepared).module_types
    raise ValueError(
        "reconstruct needs the module hierarchy of the original UNet to find its blocks (ResnetBlock2D, "
        "BasicTransformerBlock, Attention), and the graph carries none (trace it with qdiff_ao.trace and keep its "
        "graph info through prepare_fx); pass model=<the diffusers UNet that was traced> (or "
        "module_types=module_types_of(unet))"
    )


def _resolve_config(prepared: fx.GraphModule, rcfg: ReconstructionConfig | None) -> ReconstructionConfig:
    if rcfg is None:
        cfg = graph_info(prepared).config if has_graph_info(prepared) else None
        return cfg.reconstruction if isinstance(cfg, QuantConfig) else ReconstructionConfig()
    if isinstance(rcfg, QuantConfig):
        return rcfg.reconstruction
    if not isinstance(rcfg, ReconstructionConfig):
        raise TypeError(f"rcfg must be a qdiff_ao.ReconstructionConfig, got {type(rcfg).__name__}")
    return rcfg


def _graph_inputs(sim: Simulation, calib: CalibrationSet, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    device = module_device(sim.gm)
    sources = {name: getattr(calib, name) for name in _INPUT_SOURCES if getattr(calib, name) is not None}
    inputs = {}
    for node in sim.gm.graph.nodes:
        if node.op != "placeholder":
            continue
        name = str(node.target)
        if name not in sources:
            raise ValueError(
                f"the prepared graph takes input {name!r} but the calibration set provides {sorted(sources)}; "
                "prepare the model with calib.example_inputs() of this set"
            )
        inputs[name] = sources[name][rows].to(device)
    return inputs


@contextlib.contextmanager
def _frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Keep autograd off the prepared model's own parameters while rounding variables are trained."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _bake(prepared: fx.GraphModule, sim: Simulation, learned_acts: list[str]) -> None:
    """Write the learned rounding into the float weights as grid values and freeze all learned qparams."""
    for layer in sim.layers.values():
        q = layer.quant
        if not q.initialized:
            continue
        module = layer.layer
        with torch.no_grad():
            module.weight.copy_(q.dequantize_codes(q.hard_codes()).to(module.weight.dtype))
        obs = layer.weight_observer
        factory = FrozenObserver.with_args(
            scale=q.scale.clone(), zero_point=q.zero_point.clone(), dtype=obs.dtype, qscheme=obs.qscheme,
            quant_min=q.quant_min, quant_max=q.quant_max, ch_axis=q.ch_axis,
        )
        # nn.Module.__setattr__'s stub only admits Tensor | Module values; a module's qconfig is a QConfig
        module.qconfig = cast(QConfig, module.qconfig)._replace(weight=factory)  # type: ignore[assignment]
    for name in learned_acts:  # learned quantizers are LearnedStepQuant, standing in for torch.ao observers
        act = cast(LearnedStepQuant, sim.acts[name].quant)
        observer = cast(ObserverBase, prepared.get_submodule(name))
        frozen = FrozenObserver.like(observer, act.scale.detach().clone(), act.zero_point.clone())
        parent, _, leaf = name.rpartition(".")
        setattr(prepared.get_submodule(parent) if parent else prepared, leaf, frozen)


def _plan(sim: Simulation, calib: CalibrationSet, types: Mapping[str, Any]) -> tuple[Partition, list[Step], int]:
    one = _graph_inputs(sim, calib, torch.arange(1))
    return plan_cache(sim, [one[str(n.target)] for n in sim.gm.graph.nodes if n.op == "placeholder"], types)


def cache_bytes_per_row(prepared: fx.GraphModule, calib: CalibrationSet, *, model: nn.Module | None = None) -> int:
    """Bytes of cached block inputs/outputs one calibration row costs :func:`reconstruct` (both frontiers, at the
    peak of the block walk): rows cached per rank = ``min(rows, floor(max_cache_bytes / this))``. Runs one row
    through the calibrated ``prepared`` graph; nothing is cached or changed."""
    sim = build_simulation(prepared)
    sim.gm.eval()
    return _plan(sim, calib, _resolve_module_types(prepared, model, None))[2]


def _reconstruct_block(
    i: int, total: int, spec: BlockSpec, sim: Simulation, part: Partition, fp: Frontier, quant: Frontier,
    rcfg: ReconstructionConfig, chunk: int, progress: bool, learned_acts: list[str], guidance: float | None,
) -> dict[str, Any]:
    """Cache, optimise and evaluate one block; store its quantized outputs in ``quant``."""
    t0 = time.perf_counter()
    module = compile_block(sim.gm, sim.gm.graph, spec, part.meta)
    fp_out = fp.run_block(spec, module)
    fp.store(spec, fp_out)
    targets = [fp_out[k] for k in spec.loss_outputs]
    layers = [sim.layers[name] for name in spec.layers]
    acts = [sim.acts[name] for name in spec.acts]
    learnable = sim.learnable_acts(spec.acts)
    act_iters = rcfg.act_iters if learnable and spec.loss_outputs else 0
    x_q = quant.inputs(spec)  # the rest of the block runs in the simulation's default, quantized mode
    before, _ = evaluate_block(module, x_q, targets, spec.loss_outputs, rcfg.p, chunk, guidance=guidance)
    entry: dict[str, Any] = {"kind": spec.kind, "num_layers": len(layers), "layers": list(spec.layers),
                             "num_act_quantizers": len(learnable), "lp_before": before.lp, "mse_before": before.mse}
    rank, world = rank_and_world()
    seed = rcfg.seed * 1_000_003 + i if world == 1 else (rcfg.seed * 1_000_003 + i) * 4096 + rank
    trainer = BlockTrainer(module, x_q, targets, spec.loss_outputs, rcfg, torch.Generator().manual_seed(seed),
                           guidance)

    def errors(keep: bool = False) -> tuple[BlockErrors, list[torch.Tensor] | None]:
        return evaluate_block(module, x_q, targets, spec.loss_outputs, rcfg.p, chunk, keep_outputs=keep,
                              guidance=guidance)

    with tqdm(total=rcfg.weight_iters + act_iters, desc=f"[{i + 1}/{total}] {spec.name}", disable=not progress,
              leave=False, unit="it") as bar:
        entry["weight_seconds"] = trainer.learn_rounding(layers, acts, bar) if spec.loss_outputs else 0.0
        for layer in layers:
            if not layer.quant.initialized:  # nothing downstream to compare: round to nearest
                layer.quant.init_rounding(layer.layer.weight)
                layer.quant.set_mode("hard")
        rounded, outputs = errors(keep=not act_iters)
        entry["rounding"] = "adaround"
        if spec.loss_outputs and rounded.lp > before.lp:  # never worse than nearest on the cached rows
            for layer in layers:
                layer.quant.use_nearest(layer.layer.weight)
            rounded, outputs = errors(keep=not act_iters)
            entry["rounding"] = "nearest"
        after = rounded
        entry["step_sizes"] = "calibrated"
        if act_iters:
            entry.update(lp_rounded=rounded.lp, mse_rounded=rounded.mse)
            entry["act_seconds"] = trainer.learn_step_sizes(learnable, bar)
            after, outputs = errors(keep=True)
            if after.lp > rounded.lp:  # keep the calibrated step sizes unless the learned ones are better
                for act in learnable:
                    cast(LearnedStepQuant, act.quant).reset()  # learnable: a LearnedStepQuant
                after, outputs = errors(keep=True)
            else:
                entry["step_sizes"] = "learned"
                learned_acts.extend(name for name, act in zip(spec.acts, acts) if act.learnable)
    quant.store(spec, outputs)  # type: ignore[arg-type]
    entry.update(lp_after=after.lp, mse_after=after.mse, weight_iters=rcfg.weight_iters if spec.loss_outputs else 0,
                 act_iters=act_iters, seconds=time.perf_counter() - t0)
    logger.info("%s (%s, %d layers): mse %.4g -> %.4g, %.1fs", spec.name, spec.kind, len(layers), before.mse,
                after.mse, entry["seconds"])
    return entry


def _restore_block(
    spec: BlockSpec, sim: Simulation, part: Partition, fp: Frontier, quant: Frontier, state: ReconstructionState,
    learned_acts: list[str],
) -> dict[str, Any]:
    """Put a finished block's saved codes and step sizes back and advance both frontiers past it."""
    module = compile_block(sim.gm, sim.gm.graph, spec, part.meta)
    fp.store(spec, fp.run_block(spec, module))
    for name in spec.layers:
        sim.layers[name].quant.set_codes(state.codes(name))
        sim.layers[name].quant.set_mode("hard")
    for name in spec.acts:
        saved = state.act(name)
        if saved is not None:
            with torch.no_grad():
                cast(LearnedStepQuant, sim.acts[name].quant).log_ratio.copy_(saved)  # saved: a learned quantizer
            learned_acts.append(name)
    quant.store(spec, quant.run_block(spec, module))
    return {**state.blocks[spec.name], "resumed": True}


def reconstruct(
    prepared: fx.GraphModule,
    calib: CalibrationSet,
    rcfg: ReconstructionConfig | None = None,
    *,
    model: nn.Module | None = None,
    module_types: Mapping[str, Any] | None = None,
    progress: bool = True,
    state_path: str | os.PathLike[str] | None = None,
    guided: bool = True,
    restore: ReconstructionState | None = None,
) -> fx.GraphModule:
    """Reconstruct every block of a calibrated prepared UNet, then bake the result for ``convert``.

    The prepared graph is modified in place: quantized weights become AdaRound's grid values, their qparams and
    the learned activation qparams are frozen (``FrozenObserver``), and the report is stored in
    ``graph_info(prepared).reconstruction``. Runs in eval mode, on CPU or wherever the model lives.

    Under torch.distributed the rows are split across ranks and gradients averaged: every rank ends with the same
    parameters (:mod:`qdiff_ao.passes.reconstruction.data_parallel`).

    Memory: both frontiers' cached rows, ``min(len(calib), max_cache_bytes // cache_bytes_per_row)`` per rank.

    Args:
        prepared: the output of ``qdiff_ao.prepare`` (or ``prepare_fx`` with our qconfig), calibrated.
        calib: the calibration set (the same one used by ``calibrate``).
        rcfg: reconstruction settings; default: the ``QuantConfig.reconstruction`` stored by ``prepare``.
        model: the original diffusers UNet, for its module hierarchy (not needed when the graph info records
            the module types, as ``qdiff_ao.trace`` does).
        module_types: {qualified module name: class} instead of ``model``.
        progress: show one tqdm bar per block with the current loss.
        guided: with a calibration set that records classifier-free guidance pairs, cache whole pairs and add
            the error of the guided combination to the loss (:mod:`~qdiff_ao.passes.reconstruction.training`).
        state_path: make the run resumable: the learned state is saved to this safetensors file after every
            block, and a rerun with the same arguments restores the finished blocks instead of optimising
            them again (their report entries get ``"resumed": True``).
        restore: finished blocks of another run on this graph (``ReconstructionState(path, None)``) to restore
            as resumed ones (e.g. from another seed); the other blocks are learned in this run.

    Returns:
        ``prepared``, with the report in ``graph_info(prepared).reconstruction``:
        ``{"blocks": {name: {"kind", "num_layers", "layers", "num_act_quantizers", "lp_before", "lp_after",
        "mse_before", "mse_after", "rounding", "step_sizes", "weight_iters", "act_iters", "seconds",
        "weight_seconds"[, "act_seconds"]}}, "num_samples", "cache_bytes", "seconds", "config"}``, blocks in
        the order they were reconstructed. "before" is round-to-nearest weights with the calibrated activation
        qparams, "after" the learned rounding and step sizes, both on the block's cached inputs; with activation
        learning, "lp_rounded"/"mse_rounded" give the error between the two phases (learned rounding, calibrated
        activation qparams). A phase that does not lower the block's Lp error on the cached rows is undone:
        "rounding" is "adaround" or "nearest", "step_sizes" "learned" or "calibrated".

    Raises:
        TypeError: for arguments of the wrong type.
        ValueError: if the graph has no quantized layer, an observer saw no data, the calibration set lacks a
            graph input, the module hierarchy is unknown, not even one sample fits ``max_cache_bytes``, or the
            graph already has timestep groups.
    """
    if not isinstance(prepared, fx.GraphModule):
        raise TypeError(f"prepared must be the GraphModule returned by qdiff_ao.prepare, got {type(prepared).__name__}")
    if not isinstance(calib, CalibrationSet):
        raise TypeError(f"calib must be a qdiff_ao.CalibrationSet, got {type(calib).__name__}")
    if has_graph_info(prepared) and graph_info(prepared).timestep_groups is not None:
        raise ValueError("the graph already has timestep groups, whose grids were drawn from the grids "
                         "reconstruction would change; run reconstruct before passes.choose_timestep_groups")
    rcfg = _resolve_config(prepared, rcfg)
    types = _resolve_module_types(prepared, model, module_types)
    _, world = rank_and_world()
    start = time.perf_counter()
    prepared.eval()
    sim = build_simulation(prepared)
    if not sim.layers:
        raise ValueError("the prepared graph has no quantized Conv2d/Linear: nothing to reconstruct")
    sim.gm.eval()
    part, steps, per_sample = _plan(sim, calib, types)
    n = min(len(calib), rcfg.max_cache_bytes // max(per_sample, 1))
    if n < 1:
        raise ValueError(
            f"one calibration sample needs {per_sample:,} bytes of cached activations but "
            f"max_cache_bytes={rcfg.max_cache_bytes:,}; raise ReconstructionConfig.max_cache_bytes"
        )
    if n < len(calib):
        logger.warning("reconstruction caches %d of %d calibration samples (max_cache_bytes=%d, %d bytes each)",
                       n, len(calib), rcfg.max_cache_bytes, per_sample)
    if world > 1 and (state_path is not None or restore is not None):
        raise ValueError("state_path and restore are for one process; under torch.distributed run without them")
    guidance = guidance_scale(calib) if guided and n >= 2 else None
    units = guidance_pairs(calib) if guidance is not None else None
    rows, n = rows_to_cache(len(calib), n, rcfg.seed, sharded="shard" in calib.metadata, units=units)
    inputs = _graph_inputs(sim, calib, rows)
    chunk = max(4 * rcfg.batch_size, 1)
    fp = Frontier(sim.gm, part, inputs, True, sim.state, chunk)
    quant = Frontier(sim.gm, part, inputs, False, sim.state, chunk)
    blocks: dict[str, dict[str, Any]] = {}
    learned_acts: list[str] = []
    layout = [[b.name, b.layers] for b in part.blocks]
    state = None if state_path is None else ReconstructionState(
        state_path, run_fingerprint(rcfg, layout, calib, n, guidance))
    with _frozen_parameters(prepared):
        for i, step in enumerate(steps):
            spec = step.block
            fp.run_glue(step.glue)
            quant.run_glue(step.glue)
            saved = state if state is not None and state.done(spec.name) else restore
            if saved is not None and saved.done(spec.name):
                blocks[spec.name] = _restore_block(spec, sim, part, fp, quant, saved, learned_acts)
            else:
                blocks[spec.name] = _reconstruct_block(i, len(steps), spec, sim, part, fp, quant, rcfg, chunk,
                                                       progress, learned_acts, guidance)
                if state is not None:
                    codes = {name: sim.layers[name].quant.hard_codes() for name in spec.layers}
                    acts: dict[str, torch.Tensor] = {
                        name: cast(LearnedStepQuant, sim.acts[name].quant).log_ratio  # learned: LearnedStepQuant
                        for name in spec.acts if name in learned_acts
                    }
                    state.add(spec.name, blocks[spec.name], codes, acts)
            fp.free(step.free_after)
            quant.free(step.free_after)
    _bake(prepared, sim, learned_acts)
    report = {"blocks": blocks, "num_samples": n, "cache_bytes": n * per_sample, "guidance": guidance,
              "seconds": time.perf_counter() - start, "config": asdict(rcfg)}
    update_graph_info(prepared, reconstruction=report)
    return prepared
