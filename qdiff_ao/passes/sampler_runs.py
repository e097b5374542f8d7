"""One run of a sampler plan with a given denoiser: what the passes that compare float and quantized sampling share.

``run_sampler(plan, denoise, noise, hook, seed)`` runs the plan's scheduler from ``noise`` (times its
``init_noise_sigma``), calling ``denoise`` on each step's model input; with classifier-free guidance each model
batch is ``[uncond; cond]`` and the step takes ``u + w (c - u)``. Runs from the same noise and seed pair exactly:
a stochastic sampler draws its step noise from ``seed`` in every run.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import cast

import torch
from torch import fx, nn

from qdiff_ao.calibration._plan import SamplerPlan
from qdiff_ao.capture.graph_state import graph_info, has_graph_info
from qdiff_ao.passes.denoised_view import PREDICTION_TYPES
from qdiff_ao.quantizers.simulation import build_simulation

__all__ = ["Denoise", "Hook", "float_denoiser", "prediction_view", "quantized_denoiser", "quantized_forward",
           "run_sampler", "run_sampler_in_chunks"]

Denoise = Callable[[dict[str, torch.Tensor]], torch.Tensor]
Hook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def run_sampler(plan: SamplerPlan, denoise: Denoise, noise: torch.Tensor, hook: Hook | None, seed: int,
                offset: int = 0) -> torch.Tensor:
    """Run the plan's sampler on ``noise`` with ``denoise``; ``hook(i, t, x_in, guided)`` may replace each step's
    (guided) output; a stochastic sampler draws its step noise from ``seed``. ``noise`` holds trajectories
    ``offset, offset + 1, ...`` (their conditioning is the plan's for those indices). Returns the final sample."""
    scheduler = plan.fresh_scheduler()
    # a stochastic sampler draws the same step noise in every run: runs from the same noise stay paired
    generator = torch.Generator(device="cpu").manual_seed(seed)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    x = noise.to(plan.device, plan.dtype) * scheduler.init_noise_sigma
    extra = plan.unet_kwargs(offset, noise.shape[0])
    for i, t in enumerate(scheduler.timesteps):
        model_in = scheduler.scale_model_input(torch.cat([x, x]) if plan.cfg else x, t)
        out = denoise({"sample": model_in, "timestep": t.reshape(1).repeat(model_in.shape[0]), **extra})
        if plan.cfg:
            uncond, cond = out.chunk(2)
            out = uncond + plan.guidance_scale * (cond - uncond)
        x_in = model_in[: x.shape[0]]
        if hook is not None:
            out = hook(i, t, x_in, out)
        x = scheduler.step(out, t, x, **step_kwargs, return_dict=False)[0]
    return x


def run_sampler_in_chunks(plan: SamplerPlan, denoise: Denoise, noise: torch.Tensor, seed: int,
                          trajectories: int = 16) -> torch.Tensor:
    """:func:`run_sampler` (without a hook) on consecutive chunks of at most ``trajectories`` trajectories of
    ``noise``, chunk ``k`` with step-noise seed ``seed + k``; the final samples concatenated.

    Why: a UNet forward costs more per row at large batches on the CPU (the CIFAR-size UNet, 2 threads: float
    59 ms per row at batch 64, 40 ms at batch 16; lowered INT8 19 and 11 ms), and trajectories are independent.
    Two runs with the same noise, seed and chunk size stay paired exactly (a deterministic sampler gives each
    trajectory the result of one long run, up to the kernels' batch-dependent float rounding).
    """
    if trajectories < 1:
        raise ValueError(f"trajectories must be >= 1, got {trajectories}")
    parts = [run_sampler(plan, denoise, part, None, seed + k, offset=k * trajectories)
             for k, part in enumerate(noise.split(trajectories))]
    return torch.cat(parts)


def float_denoiser(plan: SamplerPlan) -> Denoise:
    """The plan's float UNet as a ``Denoise``."""
    unet = cast(nn.Module, plan.unet)
    return lambda inputs: cast(torch.Tensor, unet(**inputs, return_dict=False)[0])


def quantized_forward(prepared: fx.GraphModule, like: nn.Module, device: torch.device,
                      dtype: torch.dtype) -> Denoise:
    """The quantized model of ``prepared`` as a ``Denoise`` (UNet inputs by name -> output tensor): what the passes
    that fit on or judge the quantized model's outputs run.

    On the CPU in float32 with the x86 backend it is the model ``convert`` ships, run as ``quantize`` returns it: a
    copy of the graph lowered to INT8 kernels (with its timestep groups and any output correction) and frozen
    (``QuantizedUNet.optimize_for_inference``; ``like`` is the float UNet it stands in for). That is the model
    whose outputs count, and on the CIFAR-size UNet it runs a batch of 64 in 1.4 s where the fake-quant simulation
    takes 5.7 s (the float UNet 5.5 s; an AMX CPU; its integer attention multiplies on whichever exact GEMM is
    faster on the CPU, see ``deploy.gemm_choice``); its outputs differ from the simulation's by the lowering's rounding
    (integer requantization, the kernels' accumulation order). Elsewhere (a GPU, another backend or dtype) it is
    the fake-quant simulation, its output on ``device``. Lowering costs a deep copy, ``convert`` and a freeze
    (~8 s on the CIFAR-size UNet), so callers use it for many rows.
    """
    backend = graph_info(prepared).backend if has_graph_info(prepared) else None
    lowers_here = getattr(backend, "name", None) == "x86"  # the CPU INT8 kernels
    if backend is None or not lowers_here or device.type != "cpu" or dtype != torch.float32:
        sim = build_simulation(prepared)
        sim.gm.eval()
        return lambda inputs: sim.run(inputs).to(device)
    # imported here: deploy imports the x86 backend, which imports the passes package this module belongs to
    from qdiff_ao.deploy.quantized_unet import QuantizedUNet
    from qdiff_ao.deploy.timestep_dispatch import lower_groups

    lowered, _ = lower_groups(copy.deepcopy(prepared), backend.convert)  # convert_fx works in place
    qunet = QuantizedUNet(lowered, like=like).optimize_for_inference()
    return lambda inputs: cast(torch.Tensor, qunet(**inputs, return_dict=False)[0])


def quantized_denoiser(prepared: fx.GraphModule, plan: SamplerPlan) -> Denoise:
    """The quantized model of ``prepared`` as the sampler passes (reconstruction choice, spread correction) run it:
    :func:`quantized_forward` on the plan's device and dtype (on the CPU the lowered INT8 model ``quantize``
    ships, elsewhere the fake-quant simulation)."""
    return quantized_forward(prepared, cast(nn.Module, plan.unet), plan.device, plan.dtype)


def prediction_view(plan: SamplerPlan, user: str) -> tuple[str, torch.Tensor]:
    """``(prediction_type, alphas_cumprod on the CPU)`` of the plan's scheduler, what reading ``x0`` off an
    output needs; ``user`` names the caller in the error raised when the scheduler lacks either."""
    kind = getattr(plan.scheduler.config, "prediction_type", "epsilon")
    alphas = getattr(plan.scheduler, "alphas_cumprod", None)
    if kind not in PREDICTION_TYPES or not isinstance(alphas, torch.Tensor):
        raise ValueError(f"{user} needs a scheduler with alphas_cumprod and a prediction type in "
                         f"{PREDICTION_TYPES}; {plan.scheduler_name} has prediction_type={kind!r}"
                         f"{'' if isinstance(alphas, torch.Tensor) else ' and no alphas_cumprod'}")
    return kind, alphas.detach().float().cpu()
