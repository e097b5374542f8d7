"""Check and resolve the inputs of ``collect_calibration_data`` into a :class:`SamplerPlan`.

Everything a user can get wrong (counts, a pipeline without a UNet, a scheduler in the model's place, shapes
that disagree with the UNet config, missing or unexpected conditioning) is refused here, before any sampling,
with a message that says what was expected, what was received and how to fix it.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["SamplerPlan", "check_collect_args", "plan_sampler"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class SamplerPlan:
    """A checked sampler setup: UNet, scheduler template, shapes and conditioning on the UNet's device.

    ``cond``/``uncond`` are ``[P, L, D]`` / ``[1 or P, L, D]`` embeddings, ``class_labels`` ``[P, ...]``;
    trajectory ``j`` uses row ``j mod P``. ``cfg`` means classifier-free guidance doubles every model batch.
    """

    unet: torch.nn.Module
    scheduler: Any
    scheduler_name: str
    num_inference_steps: int
    timesteps: torch.Tensor
    device: torch.device
    dtype: torch.dtype
    sample_shape: tuple[int, ...]
    cond: torch.Tensor | None
    uncond: torch.Tensor | None
    class_labels: torch.Tensor | None
    cfg: bool
    guidance_scale: float

    @property
    def rows_per_trajectory(self) -> int:
        """Rows recorded per trajectory and step: 2 with classifier-free guidance ([uncond; cond]), else 1."""
        return 2 if self.cfg else 1

    @property
    def bytes_per_row(self) -> int:
        """Bytes of one recorded row: x_t + t + step index (+ encoder_hidden_states, class label, guidance pair)."""
        total = math.prod(self.sample_shape) * self.dtype.itemsize + self.timesteps.dtype.itemsize + 8
        total += 8 if self.cfg else 0  # guidance_pair
        for extra in (self.cond, self.class_labels):
            if extra is not None:
                total += math.prod(extra.shape[1:]) * extra.dtype.itemsize
        return total

    def fresh_scheduler(self) -> Any:
        """A new scheduler with the template's config, timesteps set, so no state leaks between chunks."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(self.num_inference_steps, device=self.device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        return scheduler

    def unet_kwargs(self, offset: int, size: int) -> dict[str, torch.Tensor]:
        """Conditioning keyword inputs of the UNet for trajectories ``offset .. offset + size - 1``."""
        kwargs: dict[str, torch.Tensor] = {}
        rows = torch.arange(offset, offset + size)
        if self.cond is not None:
            cond = self.cond[rows % self.cond.shape[0]]
            if self.cfg and self.uncond is not None:
                cond = torch.cat([self.uncond[rows % self.uncond.shape[0]], cond])
            kwargs["encoder_hidden_states"] = cond
        if self.class_labels is not None:
            kwargs["class_labels"] = self.class_labels[rows % self.class_labels.shape[0]]
        return kwargs


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_collect_args(
    num_inference_steps: Any,
    num_timesteps: Any,
    samples_per_timestep: Any,
    batch_size: Any,
    seed: Any,
    guidance_scale: Any,
    max_memory_bytes: Any,
) -> None:
    """Refuse non-integral or out-of-range counts, seed, guidance scale and memory limit."""
    _check_int("num_inference_steps", num_inference_steps, 1)
    _check_int("num_timesteps", num_timesteps, 1)
    _check_int("samples_per_timestep", samples_per_timestep, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, 0)
    _check_int("max_memory_bytes", max_memory_bytes, 0)
    if (
        isinstance(guidance_scale, bool)
        or not isinstance(guidance_scale, (int, float))
        or not math.isfinite(guidance_scale)
    ):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")


def _config(unet: torch.nn.Module) -> Any:
    """The diffusers config mapping of ``unet`` (empty when it has none)."""
    config: Any = getattr(unet, "config", None)
    return config if hasattr(config, "get") else {}


def is_pipeline(obj: Any) -> bool:
    return not isinstance(obj, torch.nn.Module) and (hasattr(obj, "components") or hasattr(obj, "unet"))


def resolve_components(model: Any, scheduler: Any) -> tuple[torch.nn.Module, Any, Any]:
    """(unet, scheduler, pipeline or None) from a UNet + scheduler or a pipeline."""
    pipeline = model if is_pipeline(model) else None
    unet = model
    if pipeline is not None:
        unet = getattr(pipeline, "unet", None)
        if unet is None:
            raise ValueError(
                f"{type(pipeline).__name__} has no `unet` (a transformer-based pipeline?); qdiff_ao calibrates "
                "diffusers UNets: pass a pipeline with .unet or the UNet itself plus a scheduler"
            )
        scheduler = scheduler if scheduler is not None else getattr(pipeline, "scheduler", None)
    if not isinstance(unet, torch.nn.Module) or "in_channels" not in _config(unet):
        raise TypeError(
            f"model must be a diffusers UNet (UNet2DModel / UNet2DConditionModel) or a pipeline with .unet, got "
            f"{type(unet).__name__}"
        )
    if scheduler is None:
        raise ValueError("scheduler is required when model is a bare UNet; pass e.g. DDIMScheduler(...) or a pipeline")
    missing = [a for a in ("set_timesteps", "step", "config", "from_config") if not hasattr(scheduler, a)]
    if missing or isinstance(scheduler, torch.nn.Module):
        raise TypeError(
            f"scheduler must be a diffusers scheduler (with set_timesteps, step, config, from_config), got "
            f"{type(scheduler).__name__}; are model and scheduler swapped?"
        )
    return unet, scheduler, pipeline


def _sample_shape(unet: torch.nn.Module, sample_shape: Sequence[int] | None) -> tuple[int, ...]:
    config = _config(unet)
    in_channels, size = config["in_channels"], config.get("sample_size")
    config_hw = None if size is None else ((size, size) if isinstance(size, int) else tuple(size))
    if sample_shape is None:
        if config_hw is None:
            raise ValueError("the UNet config has no sample_size; pass sample_shape=(C, H, W)")
        return (in_channels, *config_hw)
    shape = tuple(int(s) for s in sample_shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"sample_shape must be (C, H, W) with positive sizes, got {tuple(sample_shape)}")
    if shape[0] != in_channels:
        raise ValueError(
            f"sample_shape={shape} has {shape[0]} channels but the UNet config has in_channels={in_channels}; "
            f"use sample_shape=({in_channels}, ...)"
        )
    factor = 2 ** (len(config.get("block_out_channels", (0,))) - 1)
    if any(s % factor for s in shape[1:]):
        raise ValueError(
            f"sample_shape={shape}: spatial sizes must be multiples of {factor} (the UNet downsamples "
            f"{int(math.log2(factor))} times); the UNet config's sample_size is {size}"
        )
    if config_hw is not None and shape[1:] != config_hw:
        logger.warning("sample_shape %s differs from the UNet config sample_size %s", shape, size)
    return shape


def _check_scheduler_fits(unet: torch.nn.Module, scheduler: Any, num_inference_steps: int) -> None:
    train_steps = scheduler.config.get("num_train_timesteps")
    if train_steps is not None and num_inference_steps > train_steps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} exceeds the scheduler's num_train_timesteps={train_steps}"
        )
    unet_steps = _config(unet).get("num_train_timesteps")
    if unet_steps is not None and train_steps is not None and unet_steps != train_steps:
        raise ValueError(
            f"the UNet was built for num_train_timesteps={unet_steps} but {type(scheduler).__name__} has "
            f"num_train_timesteps={train_steps}; use a scheduler with the UNet's schedule"
        )
    for key in ("addition_embed_type", "time_cond_proj_dim"):
        if _config(unet).get(key) is not None:
            raise ValueError(
                f"UNets with {key}={_config(unet)[key]!r} (SDXL / LCM-style extra conditioning) are not supported "
                "by collect_calibration_data"
            )


def _needs_text(unet: torch.nn.Module) -> bool:
    param = inspect.signature(unet.forward).parameters.get("encoder_hidden_states")
    return param is not None and param.default is inspect.Parameter.empty


def _encode_prompts(
    pipeline: Any, prompts: Any, negative_prompt: Any, cfg: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts or not all(isinstance(p, str) for p in texts):
        raise TypeError(f"prompts must be a str or a non-empty list of str, got {prompts!r}")
    # one negative prompt per prompt: encode_prompt refuses a str beside a list of prompts
    negatives = (
        [""] * len(texts)
        if negative_prompt is None
        else ([negative_prompt] * len(texts) if isinstance(negative_prompt, str) else list(negative_prompt))
    )
    with torch.no_grad():
        if callable(getattr(pipeline, "encode_prompt", None)):
            out = pipeline.encode_prompt(texts, device, 1, cfg, negative_prompt=negatives)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise ValueError(
                    f"{type(pipeline).__name__}.encode_prompt returned {type(out).__name__} of length "
                    f"{len(out) if isinstance(out, tuple) else '?'}; only Stable-Diffusion-style "
                    "(prompt_embeds, negative_prompt_embeds) is supported: pass encoder_hidden_states="
                )
            return out[0], (out[1] if cfg else None)
        tokenizer, encoder = getattr(pipeline, "tokenizer", None), getattr(pipeline, "text_encoder", None)
        if tokenizer is None or encoder is None:
            raise ValueError(
                f"{type(pipeline).__name__} has neither encode_prompt nor tokenizer + text_encoder; "
                "pass encoder_hidden_states= instead of prompts"
            )

        def embed(batch: list[str]) -> torch.Tensor:
            ids = tokenizer(
                batch, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids
            return encoder(ids.to(device))[0]

        return embed(texts), (embed(negatives) if cfg else None)


def _check_embeddings(unet: torch.nn.Module, cond: torch.Tensor, uncond: torch.Tensor | None) -> None:
    if not isinstance(cond, torch.Tensor) or cond.dim() != 3 or cond.shape[0] < 1:
        shape = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
        raise ValueError(f"encoder_hidden_states must be a tensor [P, L, D] with P >= 1, got {shape}")
    dim = _config(unet).get("cross_attention_dim")
    if isinstance(dim, int) and cond.shape[-1] != dim:
        raise ValueError(f"encoder_hidden_states has D={cond.shape[-1]} but the UNet's cross_attention_dim={dim}")
    if uncond is not None and (
        not isinstance(uncond, torch.Tensor)
        or uncond.dim() != 3
        or uncond.shape[0] not in (1, cond.shape[0])
        or uncond.shape[1:] != cond.shape[1:]
    ):
        shape = tuple(uncond.shape) if isinstance(uncond, torch.Tensor) else type(uncond).__name__
        raise ValueError(
            f"negative_encoder_hidden_states must be [1 or {cond.shape[0]}, {cond.shape[1]}, {cond.shape[2]}] "
            f"to match encoder_hidden_states, got {shape}"
        )


def plan_sampler(
    model: Any,
    scheduler: Any,
    *,
    num_inference_steps: int,
    prompts: Any,
    guidance_scale: float,
    negative_prompt: Any,
    encoder_hidden_states: Any,
    negative_encoder_hidden_states: Any,
    class_labels: Any,
    sample_shape: Sequence[int] | None,
) -> SamplerPlan:
    """Check model, scheduler and conditioning together and return the resolved :class:`SamplerPlan`."""
    unet, scheduler, pipeline = resolve_components(model, scheduler)
    _check_scheduler_fits(unet, scheduler, num_inference_steps)
    shape = _sample_shape(unet, sample_shape)
    first = next(iter(unet.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.float32
    template = type(scheduler).from_config(scheduler.config)
    template.set_timesteps(num_inference_steps, device=device)
    timesteps = template.timesteps.detach().clone()

    needs_text = _needs_text(unet)
    if prompts is not None and encoder_hidden_states is not None:
        raise ValueError("pass either prompts or encoder_hidden_states, not both")
    if negative_prompt is not None and prompts is None:
        raise ValueError("negative_prompt needs prompts; with encoder_hidden_states use negative_encoder_hidden_states")
    if negative_encoder_hidden_states is not None and encoder_hidden_states is None:
        raise ValueError("negative_encoder_hidden_states needs encoder_hidden_states")
    given = "prompts" if prompts is not None else "encoder_hidden_states"
    if not needs_text and (prompts is not None or encoder_hidden_states is not None):
        raise ValueError(f"{type(unet).__name__} is not text-conditional (no encoder_hidden_states); drop {given}")
    if needs_text and prompts is None and encoder_hidden_states is None:
        raise ValueError(
            f"{type(unet).__name__} is conditional: pass prompts= (with a pipeline that has a text encoder) or "
            "encoder_hidden_states=[P, L, D]"
        )
    if prompts is not None and pipeline is None:
        raise ValueError(
            "prompts need a pipeline with a text encoder; for a bare UNet pass encoder_hidden_states=[P, L, D]"
        )
    cfg = needs_text and guidance_scale > 1
    cond = uncond = None
    if prompts is not None:
        cond, uncond = _encode_prompts(pipeline, prompts, negative_prompt, cfg, device)
    elif encoder_hidden_states is not None:
        cond, uncond = encoder_hidden_states, negative_encoder_hidden_states
        if cfg and uncond is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} > 1 needs the unconditional embedding: pass "
                'negative_encoder_hidden_states= (e.g. the text encoder\'s embedding of ""), or guidance_scale=1'
            )
    if cond is not None:
        _check_embeddings(unet, cond, uncond if cfg else None)
        cond = cond.to(device, dtype)
        uncond = uncond.to(device, dtype) if cfg and uncond is not None else None

    needs_label = _config(unet).get("num_class_embeds") is not None or _config(unet).get("class_embed_type") is not None
    if needs_label and class_labels is None:
        raise ValueError(f"{type(unet).__name__} is class-conditional: pass class_labels=[P] (one per trajectory)")
    if not needs_label and class_labels is not None:
        raise ValueError(f"{type(unet).__name__} has no class embedding; drop class_labels")
    labels = None
    if class_labels is not None:
        labels = torch.as_tensor(class_labels, device=device)
        if labels.dim() < 1 or labels.shape[0] < 1:
            raise ValueError(f"class_labels must be a tensor [P, ...] with P >= 1, got {tuple(labels.shape)}")

    return SamplerPlan(
        unet=unet,
        scheduler=template,
        scheduler_name=type(scheduler).__name__,
        num_inference_steps=num_inference_steps,
        timesteps=timesteps,
        device=device,
        dtype=dtype,
        sample_shape=shape,
        cond=cond,
        uncond=uncond,
        class_labels=labels,
        cfg=cfg,
        guidance_scale=float(guidance_scale),
    )
