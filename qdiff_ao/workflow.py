"""The workflow: ``prepare -> calibrate -> [passes] -> convert`` around torch.ao's FX mode, and ``quantize``,
the whole Q-Diffusion recipe in one call (collect -> trace -> split -> prepare -> calibrate -> measured float
fallback -> Q/K/V grids -> reconstruct (the final decoder stage twice, kept by a sample distance) -> timestep groups
-> output correction -> denoised spread -> convert).

A user's own torch.ao calls work as well (README, "The raw torch.ao path"): ``prepare_fx`` with
``get_qconfig_mapping(cfg)`` / ``get_backend_config(cfg)`` and ``prepare_custom_config=prepare_custom_config()``,
then ``passes.observe_softmax(prepared, cfg)``; after calibration ``passes.choose_attention_grids(prepared)`` (for
``attention_symmetric="measured"``); before ``convert_fx`` (with ``convert_custom_config()``)
``passes.freeze_wide_softmax_observers(prepared)``. The graph then carries the same graph info as one made here.

Example:
    >>> import torch, qdiff_ao
    >>> from diffusers import UNet2DModel
    >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
    ...                    norm_num_groups=4, layers_per_block=1,
    ...                    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    ...                    up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    >>> inputs = {"sample": torch.randn(2, 1, 8, 8), "timestep": torch.tensor([10, 10])}
    >>> cfg = qdiff_ao.QuantConfig(weight_bits=4, act_bits=8)
    >>> prepared = qdiff_ao.prepare(unet, cfg, inputs)
    >>> _ = prepared(**inputs)                      # calibration (use qdiff_ao.calibrate with real data)
    >>> quantized = qdiff_ao.convert(prepared)
    >>> quantized(**inputs).shape
    torch.Size([2, 1, 8, 8])
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import DDIMScheduler
from torch import fx, nn

from qdiff_ao.backends.base import Backend
from qdiff_ao.backends.x86 import X86Backend
from qdiff_ao.calibration._plan import is_pipeline, resolve_components
from qdiff_ao.calibration.calibration_set import CalibrationSet
from qdiff_ao.calibration.collection import collect_calibration_data
from qdiff_ao.calibration.distributed import init_from_environment, is_main_process
from qdiff_ao.calibration.observation import calibrate
from qdiff_ao.calibration.range_report import activation_ranges
from qdiff_ao.capture.graph_state import graph_info, has_graph_info
from qdiff_ao.capture.tracing import trace
from qdiff_ao.config import QuantConfig
from qdiff_ao.deploy.quantized_unet import QuantizedUNet
from qdiff_ao.deploy.timestep_dispatch import lower_groups
from qdiff_ao.passes.attention_operands import choose_attention_grids
from qdiff_ao.passes.fallback_rounds import run_fallback_rounds
from qdiff_ao.passes.float_tail_choice import choose_float_tail
from qdiff_ao.passes.output_correction import correct_output
from qdiff_ao.passes.prediction_spread import SAMPLER_ARGUMENTS, match_prediction_spread
from qdiff_ao.passes.reconstruction.runner import reconstruct as run_reconstruction
from qdiff_ao.passes.reconstruction_choice import reconstruct_and_choose
from qdiff_ao.passes.shortcut_split import split_shortcut
from qdiff_ao.passes.timestep_groups import choose_timestep_groups

__all__ = ["convert", "prepare", "quantize"]

logger = logging.getLogger(__name__)

_DEFAULT_BACKEND = X86Backend()


def prepare(
    model: nn.Module,
    cfg: QuantConfig,
    example_inputs: Mapping[str, torch.Tensor],
    *,
    split: bool = True,
    backend: Backend | None = None,
) -> fx.GraphModule:
    """Trace (unless ``model`` already is a GraphModule), split skip concats, insert the backend's observers.

    Args:
        model: a diffusers UNet or a GraphModule from :func:`qdiff_ao.trace`.
        cfg: the quantization settings.
        example_inputs: UNet forward arguments by name (e.g. ``calib.example_inputs()``).
        split: apply split shortcut quantization (Q-Diffusion Sec. 4.2).
        backend: the target (``qdiff_ao.backends``); default :class:`~qdiff_ao.backends.X86Backend`.

    Returns:
        The prepared GraphModule (observers inserted; calibrate it, then :func:`convert`). Its
        ``qdiff_ao.capture.graph_state`` records ``cfg`` and the backend.
    """
    if not isinstance(cfg, QuantConfig):
        raise TypeError(f"cfg must be a qdiff_ao.QuantConfig, got {type(cfg).__name__}")
    backend = backend if backend is not None else _DEFAULT_BACKEND
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a qdiff_ao.backends.Backend (e.g. X86Backend()), got "
                        f"{type(backend).__name__}")
    # Attention is decomposed into matmul/softmax/matmul only when it is quantized: the decomposed form
    # materialises the scores and is much slower than SDPA at larger batches.
    gm = model if isinstance(model, fx.GraphModule) else trace(
        model, dict(example_inputs), decompose_attention=cfg.quantize_attention and cfg.act_bits is not None
    )
    if split:
        gm = split_shortcut(gm)
    return backend.prepare(gm, cfg, example_inputs)


def convert(prepared: fx.GraphModule, *, inplace: bool = False) -> fx.GraphModule:
    """Lower a calibrated prepared graph with the backend that prepared it (``convert_fx`` underneath).

    ``convert_fx`` rewrites the graph it is given, so a deep copy is lowered and ``prepared`` stays a working
    simulation (passes, ``export_onnx``); ``inplace=True`` (torch.ao eager ``convert``'s flag) skips the copy and
    spends ``prepared``. With timestep groups the returned graph's info holds each kept group's qparams
    (``deploy.timestep_dispatch``); :class:`QuantizedUNet` runs each batch with its group's.

    Raises:
        ValueError: the graph was not prepared by :func:`prepare` (or lacks its QuantConfig).
    """
    prepared = prepared if inplace else copy.deepcopy(prepared)
    backend = graph_info(prepared).backend if has_graph_info(prepared) else None
    chosen = backend if isinstance(backend, Backend) else _DEFAULT_BACKEND
    if not has_graph_info(prepared):
        return chosen.convert(prepared)
    return lower_groups(prepared, chosen.convert)[0]


def scoring_sampler(scheduler: Any) -> DDIMScheduler:
    """DDIM (eta 0), the sampler of the passes that compare float and quantized runs: runs from one noise pair up."""
    return DDIMScheduler.from_config(scheduler.config)


def _sampler_kwargs(collect_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in collect_kwargs.items() if k in SAMPLER_ARGUMENTS}


def quantize(
    unet: Any,
    scheduler: Any = None,
    cfg: QuantConfig | None = None,
    *,
    num_inference_steps: int = 100,
    num_timesteps: int = 20,
    samples_per_timestep: int = 64,
    calibration_strategy: str = "uniform",
    split: bool = True,
    reconstruct: bool = True,
    guided_reconstruction: bool = True,
    choose_reconstruction: bool = True,
    reconstruction_candidates: int = 2,
    bias_correction: bool = True,
    precision_fallback: bool = True,
    fallback_rounds: int = 3,
    correction_groups: int = 8,
    correction_gain: bool = False,
    correction_input: bool = False,
    float_tail: bool = False,
    timestep_groups: int = 4,
    prediction_spread: bool = True,
    calib: CalibrationSet | None = None,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
    on_prepared: Any = None,
    **collect_kwargs: Any,
) -> QuantizedUNet:
    """Quantize a diffusers UNet with Q-Diffusion and return a pipeline-ready :class:`QuantizedUNet`.

    Args:
        unet: the float diffusers UNet (left unchanged), or a diffusers pipeline holding it (its ``unet`` is
            quantized; calibration runs the pipeline's own sampler, so text-to-image pipelines take ``prompts=``,
            ``guidance_scale=`` and ``negative_prompt=``, see :func:`qdiff_ao.collect_calibration_data`).
        scheduler: the diffusers scheduler whose trajectory provides calibration data (default for a pipeline:
            its own).
        cfg: quantization settings (default W4A8, ``QuantConfig()``); ``cfg.reconstruction`` sets the
            reconstruction iterations. With ``cfg.attention_symmetric == "measured"`` (opt-in) Q, K and V take
            symmetric grids after calibration where they cost at most half a bit
            (``qdiff_ao.passes.choose_attention_grids``; OpenVINO then runs attention in INT8).
        num_inference_steps, num_timesteps, samples_per_timestep, calibration_strategy: calibration data
            (see :func:`qdiff_ao.collect_calibration_data`); ignored when ``calib`` is given.
        split: split shortcut quantization.
        reconstruct: BRECQ/AdaRound block reconstruction (``qdiff_ao.passes.reconstruct``).
        guided_reconstruction: with classifier-free guidance, reconstruction also minimises the error of the
            guided combination ``u + s (c - u)`` of each trajectory's two rows (``reconstruct(guided=...)``).
        choose_reconstruction: learn the final decoder stage a second time from other draws and keep the run
            whose samples end nearest the float model's samples of the same noise
            (``passes.reconstruct_and_choose``); needs the scheduler (without one: one run).
        reconstruction_candidates: runs the choice judges, run A included (>= 2; each more relearns the final
            decoder stage once more and samples once more).
        bias_correction: subtract the mean quantization error of the model output per group of timesteps,
            kept only for groups where it lowers the error on held-back calibration rows
            (``qdiff_ao.passes.correct_output``); skipped with a warning when a timestep has < 2 rows.
        correction_groups: number of timestep groups of the output correction.
        float_tail: (opt-in) the last timesteps (<= 5% of T) run with float activations where measurement says
            so (``qdiff_ao.passes.choose_float_tail``; needs the scheduler), at float speed.
        timestep_groups: ``G > 1``: offer each of ``G`` contiguous groups of calibration timesteps its own
            activation grids, kept only where they lower the error on held-back calibration rows
            (``qdiff_ao.passes.choose_timestep_groups``); the lowered model runs one graph per kept group, sharing
            the packed weights (default 4; ``1``: one grid for every timestep; measured in docs/quality/HISTORY.md).
        prediction_spread: fit, on sampler runs of the float model and the quantized one (on the CPU the lowered
            INT8 model) from the same noise, a per-timestep-group spread of the denoised estimate ``x0`` that keeps
            the quantized sampler's per-channel spread equal to the float sampler's, kept only where held-back runs
            say it helps (``qdiff_ao.passes.match_prediction_spread``); needs the scheduler (skipped with a warning
            without one).
        correction_gain: let a group of the output correction take a per-channel gain as well as an offset
            (PTQD's ``eps_q ~ (1 + k_t) eps + b_t``), where that fits the held-back rows best (off by default:
            no FD gain measured, see docs/DESIGN.md).
        correction_input: let a group of the output correction take the linear estimate ``a y + c x - b`` of
            the float output from the quantized output ``y`` and the UNet's input ``x`` where that fits the
            held-back rows best (off by default: shapes32 samples closer to FP, FD not consistently lower,
            digits slightly worse; see ``passes.correct_output`` and docs/quality/HISTORY.md).
        precision_fallback: measure which quantizers the model cannot afford (one quantizer alone causing most
            of its kind's output error at some step, activations against the activations' own error, e.g. the
            input quantizer near ``t = 0`` under linear betas) and keep the layers reading them in float, within
            5% of the quantized multiply-accumulates (``qdiff_ao.passes.choose_float_layers``); the chosen names
            go to ``cfg.keep_float``. Weights-only configs (``act_bits=None``): only weight quantizers compete.
        fallback_rounds: measurement rounds of the fallback: after each round that keeps new layers in float the
            model is prepared again (observer statistics copied over, ``qdiff_ao.passes.fallback_rounds``) and
            measured again (a dominant quantizer hides the next one: the input quantizer's error near t = 0 dwarfs
            the rest until it is gone), until a round finds nothing or the 5% budget, shared by all rounds, is
            spent.
        calib: a ready CalibrationSet.
        batch_size: calibration batch size.
        seed: seed of calibration sampling.
        progress: tqdm bars.
        on_prepared: optional ``f(prepared, calib)``, run after calibration and reconstruction (reports, plots).
        **collect_kwargs: forwarded to ``collect_calibration_data`` (e.g. ``encoder_hidden_states``).

    Under ``torchrun`` (or an initialised process group) calibration data are sampled and observed data-parallel
    and merged exactly (:mod:`qdiff_ao.calibration.distributed`); the later steps run on the whole set on every
    rank, so every rank returns the same model. Save from any rank: only rank 0 writes.

    Returns:
        The quantized UNet; ``.quantization_info`` holds timings, the calibration timesteps, the most drifting
        activation ranges and the reconstruction report.

    Example:
        >>> import qdiff_ao
        >>> from diffusers import DDIMScheduler, UNet2DModel
        >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        ...                    norm_num_groups=4, layers_per_block=1,
        ...                    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        ...                    up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
        >>> qunet = qdiff_ao.quantize(unet, DDIMScheduler(), qdiff_ao.QuantConfig(), num_inference_steps=4,
        ...                           num_timesteps=2, samples_per_timestep=2, reconstruct=False, progress=False)
        >>> sorted(qunet.quantization_info["calibration_timesteps"])
        [0, 750]
    """
    cfg = cfg or QuantConfig()
    if not isinstance(timestep_groups, int) or isinstance(timestep_groups, bool) or timestep_groups < 1:
        raise ValueError(f"timestep_groups must be an int >= 1 (1: one grid for every timestep), got "
                         f"{timestep_groups!r}")
    if (not isinstance(reconstruction_candidates, int) or isinstance(reconstruction_candidates, bool)
            or reconstruction_candidates < 2):
        raise ValueError(f"reconstruction_candidates must be an int >= 2 (run A and at least one rerun of the "
                         f"final decoder stage; choose_reconstruction=False makes one run), got "
                         f"{reconstruction_candidates!r}")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    init_from_environment()  # under torchrun: join the process group (see qdiff_ao.calibration.distributed)
    progress = progress and is_main_process()
    if calib is not None and "shard" in calib.metadata and (precision_fallback or reconstruct or bias_correction):
        raise ValueError(
            f"calib is rank {calib.metadata['shard']}'s shard (keep_shards=True): the precision fallback, "
            "reconstruction and output correction need the whole set on every rank; collect it gathered "
            "(keep_shards=False) or turn those steps off"
        )
    calibration_model = unet
    if is_pipeline(unet):
        unet, scheduler, _ = resolve_components(unet, scheduler)
    if calib is None:
        calib = collect_calibration_data(
            calibration_model, scheduler, num_inference_steps=num_inference_steps, num_timesteps=num_timesteps,
            samples_per_timestep=samples_per_timestep, strategy=calibration_strategy, batch_size=batch_size,
            seed=seed, progress=progress, **collect_kwargs,
        )
    timings["collect_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # trace on two rows of one timestep when a timestep has two (the batch stays free either way)
    example_rows = min(2, max(calib.timestep_histogram().values()))
    prepared = prepare(unet, cfg, calib.example_inputs(example_rows), split=split)
    timings["trace_prepare_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    calibrate(prepared, calib, batch_size=batch_size, progress=progress)
    timings["calibrate_s"] = time.perf_counter() - t0
    fallback = None
    if precision_fallback:  # weights-only too: a 4-bit output layer can carry most of the error alone
        t0 = time.perf_counter()
        fallback, cfg, prepared = run_fallback_rounds(
            prepared, cfg, calib, lambda c: prepare(unet, c, calib.example_inputs(example_rows), split=split),
            rounds=fallback_rounds, batch_size=batch_size, progress=progress)
        timings["precision_fallback_s"] = time.perf_counter() - t0
    attention_grids = None
    if cfg.attention_symmetric == "measured" and cfg.act_bits is not None:  # on the final calibration
        attention_grids = [c.to_dict() for c in choose_attention_grids(prepared)]
    ranges = activation_ranges(prepared)
    recon_report = None
    if reconstruct:
        t0 = time.perf_counter()
        if choose_reconstruction and scheduler is not None:
            prepared = reconstruct_and_choose(prepared, calib, cfg.reconstruction, calibration_model,
                                              scoring_sampler(scheduler), model=unet, progress=progress,
                                              guided=guided_reconstruction, seed=seed,
                                              candidates=reconstruction_candidates,
                                              **_sampler_kwargs(collect_kwargs))
        else:
            run_reconstruction(prepared, calib, cfg.reconstruction, model=unet, progress=progress,
                               guided=guided_reconstruction)
        recon_report = graph_info(prepared).reconstruction
        timings["reconstruct_s"] = time.perf_counter() - t0
    tail_report, t0 = None, time.perf_counter()
    if float_tail and cfg.act_bits is not None and scheduler is not None:
        tail_report = choose_float_tail(prepared, calib, num_train_timesteps=scheduler.config.num_train_timesteps)
        timings["float_tail_s"] = time.perf_counter() - t0
    groups_report = None
    if timestep_groups > 1 and cfg.act_bits is not None:
        t0 = time.perf_counter()
        if min(calib.timestep_histogram().values()) < 2:
            logger.warning("timestep groups skipped: they need >= 2 calibration rows per timestep")
        else:
            choose_timestep_groups(prepared, calib, num_groups=timestep_groups, batch_size=batch_size)
            groups_report = graph_info(prepared).timestep_groups.report
            timings["timestep_groups_s"] = time.perf_counter() - t0
    bias_report = None
    if bias_correction:
        t0 = time.perf_counter()
        if min(calib.timestep_histogram().values()) < 2:
            logger.warning("output correction skipped: it needs >= 2 calibration rows per timestep")
        else:
            correct_output(prepared, calib, unet, num_groups=correction_groups, gain=correction_gain,
                           input_term=correction_input, batch_size=batch_size)
            bias_report = graph_info(prepared).bias_correction
            timings["bias_correction_s"] = time.perf_counter() - t0
    spread_report = None
    if prediction_spread:
        t0 = time.perf_counter()
        if scheduler is None:
            logger.warning("prediction spread skipped: it samples with the scheduler, and none was given")
        else:
            recorded = str(calib.metadata.get("num_inference_steps", ""))
            steps = min(50, int(recorded) if recorded.isdigit() else num_inference_steps)
            try:
                match_prediction_spread(prepared, calib, calibration_model, scoring_sampler(scheduler),
                                        num_groups=correction_groups, num_inference_steps=steps, seed=seed,
                                        **_sampler_kwargs(collect_kwargs))
            except ValueError as err:  # e.g. a conditional UNet with a ready calib but no conditioning given
                logger.warning("prediction spread skipped: %s", err)
            else:
                spread_report = graph_info(prepared).prediction_spread
                timings["prediction_spread_s"] = time.perf_counter() - t0
    if on_prepared is not None:
        on_prepared(prepared, calib)
    t0 = time.perf_counter()
    splits = [r.to_dict() for r in graph_info(prepared).splits or ()]
    quantized = convert(prepared, inplace=True)  # prepared is ours, not the user's
    timings["convert_s"] = time.perf_counter() - t0
    qunet = QuantizedUNet(quantized, like=unet)
    qunet.quantization_info = {
        "config": cfg.to_dict(),
        "timings": timings,
        "calibration_timesteps": calib.timesteps(),
        "calibration_samples": len(calib),
        "splits": splits,
        "most_drifting": [{"value": r["value"], "drift": r["drift"]} for r in ranges[:10]],
        "reconstruction": recon_report,
        "bias_correction": bias_report,
        "timestep_groups": groups_report,
        "float_tail": tail_report,
        "prediction_spread": spread_report,
        "precision_fallback": fallback,
        "attention_grids": attention_grids,
    }
    with torch.no_grad():
        qunet(**calib.example_inputs(1))  # fail here, not in the user's pipeline, if anything is off
    return qunet
