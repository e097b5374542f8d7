"""Loading and sampling the zoo models, with classifier-free guidance for the class-conditional one.

:class:`GuidedDenoiser` turns a class-conditional UNet into the ``model(x, t).sample`` callable the samplers and
metrics of :mod:`qdiff_ao.app` use: row ``j`` of a batch of ``B`` gets class ``j mod K`` and

    out = f(x, t, null) + s * (f(x, t, c_j) - f(x, t, null))

computed in one UNet call on the doubled batch ``[x; x]`` with ``[null; c]`` tokens -- the batch layout the
calibration collector records, so a quantized UNet sees at sampling what it was calibrated on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import diffusers
import torch
from diffusers import DDPMScheduler
from diffusers.utils import BaseOutput

from qdiff_ao.app.sampling import ddim_sample, initial_noise
from qdiff_ao.app.zoo.conditioning import ClassTokens
from qdiff_ao.app.zoo.registry import ZooEntry, zoo_entry

__all__ = ["GuidedDenoiser", "ZooModel", "load_zoo", "zoo_sample"]


@dataclass
class _Output(BaseOutput):
    sample: torch.Tensor


class GuidedDenoiser:
    """``model(x, t).sample`` with classifier-free guidance over classes ``j mod K`` (see module docstring)."""

    def __init__(self, unet: Any, tokens: ClassTokens, guidance_scale: float) -> None:
        self.unet, self.tokens, self.guidance_scale = unet, tokens, float(guidance_scale)
        self.config = unet.config

    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, timestep: Any) -> _Output:
        b = sample.shape[0]
        labels = torch.arange(b) % self.tokens.num_classes
        null = torch.full((b,), self.tokens.null_class)
        states = self.tokens(torch.cat([null, labels]))
        t = torch.as_tensor(timestep)
        if t.dim() == 1 and t.numel() == b:
            t = torch.cat([t, t])
        out = self.unet(torch.cat([sample, sample]), t, encoder_hidden_states=states).sample
        uncond, cond = out.chunk(2)
        return _Output(sample=uncond + self.guidance_scale * (cond - uncond))


@dataclass
class ZooModel:
    """A loaded zoo model: the float UNet, its scheduler config and, if conditional, its class tokens."""

    entry: ZooEntry
    unet: Any
    scheduler: Any  # a DDPMScheduler (typed Any: diffusers' config attribute is dynamic)
    tokens: ClassTokens | None

    def denoiser(self, unet: Any = None) -> Any:
        """``unet`` (default: the float one) as the ``model(x, t).sample`` callable sampling uses."""
        unet = self.unet if unet is None else unet
        if self.tokens is None:
            return unet
        return GuidedDenoiser(unet, self.tokens, self.entry.guidance_scale)

    def calibration_kwargs(self) -> dict[str, Any]:
        """Extra arguments of :func:`qdiff_ao.collect_calibration_data` (class tokens and guidance)."""
        if self.tokens is None:
            return {}
        with torch.no_grad():
            cond = self.tokens(torch.arange(self.tokens.num_classes))
            null = self.tokens(torch.tensor([self.tokens.null_class]))
        return dict(encoder_hidden_states=cond, negative_encoder_hidden_states=null,
                    guidance_scale=self.entry.guidance_scale)


def load_zoo(name: str) -> ZooModel:
    """Load the trained zoo model ``name`` from its folder.

    Raises:
        ValueError: unknown name. FileNotFoundError: the model has not been trained (the message says how).
    """
    entry = zoo_entry(name)
    if not (entry.folder / "unet" / "config.json").is_file():
        raise FileNotFoundError(
            f"zoo model {name!r} is not trained ({entry.folder} has no unet/); run "
            f"python examples/train_zoo.py {name} --resume"
        )
    unet = getattr(diffusers, entry.unet_class).from_pretrained(entry.folder, subfolder="unet").eval()
    scheduler = DDPMScheduler.from_pretrained(entry.folder, subfolder="scheduler")
    tokens = ClassTokens.load(entry.folder) if entry.conditional else None
    return ZooModel(entry, unet, scheduler, tokens)


def zoo_sample(name: str, num_samples: int, *, seed: int = 0, unet: Any = None, steps: int = 50,
               progress: bool = True) -> torch.Tensor:
    """DDIM-``steps`` samples in ``[-1, 1]`` of zoo model ``name`` (or of ``unet`` in its place)."""
    model = load_zoo(name)
    noise = initial_noise(model.unet, num_samples, seed)
    return ddim_sample(model.denoiser(unet), model.scheduler.config, noise, num_inference_steps=steps,
                       progress=progress)
