"""Configuration of a quantization run: a frozen dataclass that validates itself on construction.

Defaults follow Q-Diffusion (W4A8): channel-wise symmetric 4-bit weights, 8-bit unsigned activations, range
search by Lp error with p = 2.4, attention probabilities at 8 bits with zero point 0, one set of qparams for all
timesteps with per-step statistics recorded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from qdiff_ao.observers.registry import get_observer
from qdiff_ao.primitives import qrange

__all__ = ["QuantConfig", "ReconstructionConfig"]

_GRANULARITIES = ("per_channel", "per_tensor")
_RANGE_METHODS = ("minmax", "lp")
_REDUCE_RANGE = ("auto", "none", "weights", "activations")


@dataclass(frozen=True)
class ReconstructionConfig:
    """BRECQ-style block reconstruction with AdaRound (Q-Diffusion Sec. 4.3); see ``passes.reconstruct``.

    The defaults are sized for a CPU: full W4A8 reconstruction of a google/ddpm-cifar10-32-sized UNet
    (35.7M parameters, 38 blocks) in about 20 minutes on one core (``benchmarks/reconstruction.py``). Few
    iterations need larger learning rates than the reference's (Q-Diffusion: 20,000 iterations, batch 32,
    lr 1e-3 on a GPU); for the same compute, more iterations on smaller batches reconstruct better.

    Attributes:
        weight_iters: AdaRound iterations per block.
        act_iters: activation step-size (LSQ) iterations per block; 0 disables.
        batch_size: calibration samples per optimisation step.
        weight_lr: Adam learning rate of the rounding variables.
        act_lr: Adam learning rate of the activation step sizes, parameterised as s = s0 * exp(u)
            (so it is a relative step), with cosine decay.
        reg_weight: weight of AdaRound's rounding regulariser (0.01).
        warmup: fraction of iterations without the regulariser (0.2).
        beta_start, beta_end: temperature of the regulariser, annealed start -> end (20 -> 2).
        p: exponent of the output error |y - y_hat|^p (2.4; 2 is MSE).
        max_cache_bytes: memory allowed for the cached block inputs/outputs (full-precision and quantized
            activations of the calibration rows kept for later blocks); fewer rows are used when needed.
        seed: seed of the row subset and of the mini-batch draws.
    """

    weight_iters: int = 300
    act_iters: int = 50
    batch_size: int = 4
    weight_lr: float = 5e-2
    act_lr: float = 1e-2
    reg_weight: float = 0.01
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    p: float = 2.4
    max_cache_bytes: int = 2**30
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("weight_iters", "act_iters"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("weight_lr", "act_lr", "p", "max_cache_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        if not self.beta_start >= self.beta_end > 0:
            raise ValueError(f"need beta_start >= beta_end > 0, got {self.beta_start}, {self.beta_end}")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    Attributes:
        weight_bits: weight bits, 2..8 (signed codes, symmetric).
        act_bits: activation bits, 4..8, or None for weights-only quantization.
        softmax_bits: bits of attention probabilities, 8 or 16 (unsigned, zero point 0).
        weight_granularity: "per_channel" (default, Q-Diffusion) or "per_tensor".
        act_symmetric: symmetric activations (zero point at the middle of the uint8 range) instead of affine.
        range_method: "lp" (Lp-error range search, Q-Diffusion) or "minmax".
        lp_norm: the p of the Lp search (2.4).
        running_stat: activations' min/max as an exponential moving average (Q-Diffusion ``running_stat``);
            applies when range_method is "minmax".
        momentum: momentum of the running statistics (0.95).
        reduce_range: "auto" | "none" | "weights" | "activations". This CPU's int8 kernels (fbgemm/onednn
            without VNNI) accumulate pairs of uint8 x int8 products in int16 and saturate when both operands use
            their full 8-bit ranges. "weights" limits 8-bit weights to [-64, 63]; "activations" limits 8-bit
            activations to [0, 127]; "auto" picks "weights" for W8A8 (activations are the harder half of a
            diffusion UNet, Q-Diffusion Sec. 3) and "none" otherwise (4-bit weights cannot saturate).
        timestep_aware: wrap activation observers in ``TimestepAwareObserver`` (per-step statistics).
        quantize_attention: quantize Q, K, V (act_bits) and softmax outputs (softmax_bits) of attention.
        attention_symmetric: the grids of Q, K and V. ``False`` (default): affine. ``"measured"``: calibrated
            affine, then each takes the symmetric grid of the same statistics where that costs at most half a bit
            of resolution (``passes.choose_attention_grids``, run by ``qdiff_ao.quantize`` after calibration);
            ``True``: symmetric from the start (``passes.symmetric_attention_operands``). A symmetric grid has zero
            point 128 and is exported as INT8 with zero point 0, so the attention matmuls have no zero-point
            terms and OpenVINO runs them in INT8: 8-10% faster on the CIFAR config, ~26% on an SD-shaped UNet
            (README, speed). Not the default: without reconstruction symmetric Q/K/V left shapes32's eps error
            and FD unchanged, but after reconstruction its W4A8 FD was 0.17-0.31x FP worse on each of 3
            reconstruction seeds, mostly a cost of learning their step sizes; reconstruction now keeps those at
            the calibrated values, which halves the cost (1.256x vs 1.176x FP affine, mean of 3 seeds; README,
            quality). Configs recorded without the field read as ``False``.
        weight_observer, act_observer: names from the observer registry overriding the built-in choice.
        reconstruction: settings of the reconstruction pass.
        keep_float: module names of Conv2d/Linear layers that stay in float (their weights and the activation
            quantizers that only they read are not inserted). ``qdiff_ao.quantize`` fills it by measurement
            (``qdiff_ao.passes.choose_float_layers``); checkpoints record it, so a loaded model rebuilds the
            same graph.

    Example:
        >>> QuantConfig(weight_bits=4, act_bits=8).weight_qrange()
        (-8, 7)
        >>> QuantConfig(weight_bits=8, act_bits=8).weight_qrange()   # reduce_range="auto": no int16 saturation
        (-64, 63)
    """

    weight_bits: int = 4
    act_bits: int | None = 8
    softmax_bits: int = 8
    weight_granularity: str = "per_channel"
    act_symmetric: bool = False
    range_method: str = "lp"
    lp_norm: float = 2.4
    running_stat: bool = False
    momentum: float = 0.95
    reduce_range: str = "auto"
    timestep_aware: bool = True
    quantize_attention: bool = True
    attention_symmetric: bool | str = False
    weight_observer: str | None = None
    act_observer: str | None = None
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    keep_float: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"QuantConfig.{name} must be {allowed}, got {getattr(self, name)!r}")

        if not isinstance(self.weight_bits, int) or not 2 <= self.weight_bits <= 8:
            raise bad("weight_bits", "an integer in [2, 8]")
        if self.act_bits is not None and (not isinstance(self.act_bits, int) or not 4 <= self.act_bits <= 8):
            raise bad("act_bits", "an integer in [4, 8] or None (weights only)")
        if self.softmax_bits not in (8, 16):
            raise bad("softmax_bits", "8 or 16")
        if self.weight_granularity not in _GRANULARITIES:
            raise bad("weight_granularity", f"one of {_GRANULARITIES}")
        if self.range_method not in _RANGE_METHODS:
            raise bad("range_method", f"one of {_RANGE_METHODS}")
        if not self.lp_norm > 0:
            raise bad("lp_norm", "> 0")
        if not 0 <= self.momentum < 1:
            raise bad("momentum", "in [0, 1)")
        for flag in ("act_symmetric", "running_stat", "timestep_aware", "quantize_attention"):
            if not isinstance(getattr(self, flag), bool):
                raise bad(flag, "True or False")
        if not (isinstance(self.attention_symmetric, bool) or self.attention_symmetric == "measured"):
            raise bad("attention_symmetric", "True, False or \"measured\"")
        if self.reduce_range not in _REDUCE_RANGE:
            raise bad("reduce_range", f"one of {_REDUCE_RANGE}")
        if not isinstance(self.reconstruction, ReconstructionConfig):
            raise bad("reconstruction", "a ReconstructionConfig")
        if isinstance(self.keep_float, list):  # from JSON
            object.__setattr__(self, "keep_float", tuple(self.keep_float))
        if not isinstance(self.keep_float, tuple) or not all(isinstance(n, str) and n for n in self.keep_float):
            raise bad("keep_float", "a tuple of module names (e.g. ('conv_in',))")
        if len(set(self.keep_float)) != len(self.keep_float):
            raise bad("keep_float", "a tuple without repeated names")
        for name in ("weight_observer", "act_observer"):
            value = getattr(self, name)
            if value is not None:
                try:
                    get_observer(value)
                except KeyError as err:
                    raise ValueError(f"QuantConfig.{name}={value!r}: {err.args[0]}") from None

    @property
    def effective_reduce_range(self) -> str:
        """``reduce_range`` with "auto" resolved."""
        if self.reduce_range != "auto":
            return self.reduce_range
        return "weights" if self.weight_bits == 8 and self.act_bits == 8 else "none"

    def weight_qrange(self) -> tuple[int, int]:
        """Signed code range of weights: [-2^(b-1), 2^(b-1) - 1], one bit less under reduce_range="weights"."""
        bits = self.weight_bits
        if self.effective_reduce_range == "weights" and bits == 8:
            bits = 7
        return qrange(bits, signed=True)

    def act_qrange(self) -> tuple[int, int] | None:
        """Unsigned code range of activations, or None for weights-only."""
        if self.act_bits is None:
            return None
        bits = self.act_bits
        if self.effective_reduce_range == "activations" and bits == 8:
            bits = 7
        return qrange(bits, signed=False)

    @property
    def name(self) -> str:
        """Short scheme name, e.g. "W4A8" or "W4A32" (weights only)."""
        return f"W{self.weight_bits}A{self.act_bits if self.act_bits is not None else 32}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for checkpoints and reports)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError."""
        data = dict(data)
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown QuantConfig fields {sorted(unknown)}; known: {sorted(known)}")
        data.setdefault("attention_symmetric", False)  # absent: recorded before it existed, or False
        if isinstance(data.get("reconstruction"), dict):
            data["reconstruction"] = ReconstructionConfig(**data["reconstruction"])
        return cls(**data)
