"""A set of recorded UNet inputs ``(x_t, t[, cond])`` used to calibrate a quantized diffusion UNet.

Q-Diffusion (Sec. 4.1) shows that a diffusion UNet's activation ranges drift across denoising steps, so the
calibration data are the full-precision sampler's own intermediate inputs taken across the trajectory.
:func:`qdiff_ao.calibration.collection.collect_calibration_data` builds a :class:`CalibrationSet`; this module only
stores it, groups it by timestep and round-trips it through safetensors (no pickle).

Row ``i`` of the set is one UNet input exactly as the model saw it during sampling::

    sample[i]                 x_t after scheduler.scale_model_input, shape [C, H, W]
    timestep[i]               t, in the scheduler's dtype (int64 for DDPM/DDIM/PNDM, float32 for Euler)
    encoder_hidden_states[i]  text conditioning [L, D] (conditional UNets only)
    class_labels[i]           class conditioning (class-conditional UNets only)
    step_index[i]             position of t in the sampler's timestep list (several steps may share a t)
    guidance_pair[i]          classifier-free guidance: -k on the unconditional, +k on the conditional row of
                              pair k >= 1 (one trajectory at one step); the scale is metadata["guidance_scale"]
    float_output[i]           the float UNet's own output on row i (raw, before guidance), recorded by the
                              collector: the output correction reads it instead of running the model again
                              (:mod:`qdiff_ao.calibration.float_reference` checks it first)

Example:
    >>> import torch
    >>> calib = CalibrationSet(torch.zeros(4, 3, 8, 8), torch.tensor([999, 999, 499, 499]))
    >>> calib.timesteps(), calib.timestep_histogram()
    ([499, 999], {499: 2, 999: 2})
    >>> [(t, inputs["sample"].shape[0]) for t, inputs in calib.batches(2)]
    [(999, 2), (499, 2)]
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = ["CalibrationSet"]

logger = logging.getLogger(__name__)

_FORMAT_KEY = "qdiff_ao_format"
_FORMAT_NAME = "calibration_set"
_VERSION_KEY = "qdiff_ao_format_version"
_VERSION = "2"  # 2: the tensors' SHA-256 in the metadata (version 1 files load without that check)
_SHA_KEY = "qdiff_ao_tensors_sha256"
_READABLE_VERSIONS = ("1", _VERSION)
_OPTIONAL = ("encoder_hidden_states", "class_labels", "step_index", "guidance_pair", "float_output")


def _as_number(value: torch.Tensor) -> int | float:
    """A 0-d tensor as an exact Python number: ``int`` for integer dtypes, ``float`` otherwise."""
    return float(value.item()) if value.is_floating_point() else int(value.item())


class CalibrationSet:
    """Recorded UNet inputs ``(x_t, t[, cond])``, grouped by timestep for calibration.

    Args:
        sample: ``x_t`` as fed to the UNet, shape ``[N, C, H, W]``.
        timestep: the timestep of each row, shape ``[N]``; exact scheduler values are kept in their dtype.
        encoder_hidden_states: optional cross-attention conditioning, shape ``[N, L, D]``.
        class_labels: optional class conditioning, shape ``[N, ...]``.
        step_index: optional index of each row's step in the sampler's timestep list, shape ``[N]``.
        guidance_pair: optional classifier-free guidance pairing, shape ``[N]``: ``-k`` / ``+k`` on the
            unconditional / conditional row of pair ``k >= 1``; needs ``metadata["guidance_scale"]``.
        float_output: optional float UNet output on each row, shape ``[N, ...]`` (not a UNet input: ``batches``
            and ``example_inputs`` leave it out).
        metadata: string key/value pairs saved with the set (strategy, scheduler, seed, ...).

    Raises:
        TypeError: if a tensor argument is not a tensor.
        ValueError: if the set is empty, shapes disagree on ``N``, or timesteps are not finite.
    """

    def __init__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        step_index: torch.Tensor | None = None,
        guidance_pair: torch.Tensor | None = None,
        metadata: dict[str, str] | None = None,
        float_output: torch.Tensor | None = None,
    ) -> None:
        named = {
            "sample": sample,
            "timestep": timestep,
            "encoder_hidden_states": encoder_hidden_states,
            "class_labels": class_labels,
            "step_index": step_index,
            "guidance_pair": guidance_pair,
            "float_output": float_output,
        }
        for name, value in named.items():
            if value is not None and not isinstance(value, torch.Tensor):
                raise TypeError(f"CalibrationSet: {name} must be a torch.Tensor, got {type(value).__name__}")
        if sample.dim() < 2 or sample.shape[0] == 0:
            raise ValueError(
                f"CalibrationSet: sample must have shape [N, C, H, W] with N >= 1, got {tuple(sample.shape)}"
            )
        n = sample.shape[0]
        if timestep.dim() != 1:
            raise ValueError(f"CalibrationSet: timestep must be 1-d [N], got shape {tuple(timestep.shape)}")
        for name, value in named.items():
            if value is not None and value.shape[0] != n:
                raise ValueError(
                    f"CalibrationSet: {name} has {value.shape[0]} rows but sample has {n}; every tensor "
                    "must hold one row per recorded UNet input"
                )
        if timestep.dtype == torch.bool or timestep.is_complex():
            raise TypeError(f"CalibrationSet: timestep must hold integer or real timesteps, got {timestep.dtype}; "
                            "pass the scheduler's timesteps (e.g. torch.full((n,), t))")
        if timestep.is_floating_point() and not bool(torch.isfinite(timestep).all()):
            raise ValueError("CalibrationSet: timestep contains NaN/Inf; timesteps must be finite")
        if not sample.is_floating_point() or not bool(torch.isfinite(sample).all()):
            raise ValueError(f"CalibrationSet: sample must be a finite floating-point tensor (got {sample.dtype}"
                             f"{'' if not sample.is_floating_point() else ' with NaN/Inf values'}); calibrating "
                             "on it would give observers meaningless ranges")
        if float_output is not None and (not float_output.is_floating_point()
                                         or not bool(torch.isfinite(float_output).all())):
            kind = "with NaN/Inf values" if float_output.is_floating_point() else "not floating point"
            raise ValueError(f"CalibrationSet: float_output must hold the float UNet's finite outputs, got "
                             f"{float_output.dtype} {kind}; pass float_output=None and the passes run the model")
        self.sample = sample
        self.timestep = timestep
        self.encoder_hidden_states = encoder_hidden_states
        self.class_labels = class_labels
        self.step_index = step_index
        self.guidance_pair = guidance_pair
        self.float_output = float_output
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in (metadata or {}).items()}
        if guidance_pair is not None:
            _check_guidance_pairs(guidance_pair, self.metadata)

    def __len__(self) -> int:
        return self.sample.shape[0]

    def __repr__(self) -> str:
        cond = "" if self.encoder_hidden_states is None else f", cond={tuple(self.encoder_hidden_states.shape[1:])}"
        return (
            f"CalibrationSet(n={len(self)}, sample={tuple(self.sample.shape[1:])}, "
            f"timesteps={len(self.timesteps())}{cond}, nbytes={self.nbytes})"
        )

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {"sample": self.sample, "timestep": self.timestep}
        for name in _OPTIONAL:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held by all tensors of the set: ``sum(t.numel() * t.element_size())``."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    @property
    def bytes_per_sample(self) -> int:
        """Bytes of one row (x_t + t + cond + labels + step index + float output): ``nbytes // len(self)``."""
        return self.nbytes // len(self)

    def timesteps(self) -> list[int | float]:
        """The distinct timesteps of the set, sorted ascending, as exact Python numbers."""
        return [_as_number(t) for t in torch.unique(self.timestep, sorted=True)]

    def timestep_histogram(self) -> dict[int | float, int]:
        """Number of rows per timestep, ``{t: count}``, keys sorted ascending."""
        values, counts = torch.unique(self.timestep, sorted=True, return_counts=True)
        return {_as_number(t): int(c) for t, c in zip(values, counts, strict=True)}

    def _rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        inputs = {"sample": self.sample[index], "timestep": self.timestep[index]}
        if self.encoder_hidden_states is not None:
            inputs["encoder_hidden_states"] = self.encoder_hidden_states[index]
        if self.class_labels is not None:
            inputs["class_labels"] = self.class_labels[index]
        return inputs

    def batches(self, batch_size: int) -> Iterator[tuple[int | float, dict[str, torch.Tensor]]]:
        """Yield ``(t, inputs)`` batches in which every row has timestep ``t``.

        Timesteps come in decreasing order (the order a sampler visits them); rows of one timestep keep
        their stored order and are cut into batches of ``batch_size`` (the last one may be smaller).
        ``inputs`` maps UNet forward argument names to tensors: ``sample`` [B, C, H, W], ``timestep`` [B]
        and, when present, ``encoder_hidden_states`` [B, L, D] and ``class_labels`` [B, ...].

        Args:
            batch_size: maximum rows per batch, >= 1.

        Raises:
            ValueError: if ``batch_size < 1``.
        """
        _check_batch_size(batch_size)
        for t in torch.unique(self.timestep, sorted=True).flip(0):
            rows = torch.nonzero(self.timestep == t).flatten()
            for start in range(0, rows.numel(), batch_size):
                yield _as_number(t), self._rows(rows[start : start + batch_size])

    def num_batches(self, batch_size: int) -> int:
        """How many batches :meth:`batches` yields: ``sum_t ceil(count_t / batch_size)``."""
        _check_batch_size(batch_size)
        return sum(-(-count // batch_size) for count in self.timestep_histogram().values())

    def example_inputs(self, batch_size: int = 1) -> dict[str, torch.Tensor]:
        """One batch of ``batch_size`` rows sharing a timestep, as UNet keyword inputs (for tracing).

        Rows come from the highest timestep that has at least ``batch_size`` rows.

        Raises:
            ValueError: if ``batch_size < 1`` or no timestep has ``batch_size`` rows.
        """
        _check_batch_size(batch_size)
        for _, inputs in self.batches(batch_size):
            if inputs["sample"].shape[0] == batch_size:
                return inputs
        largest = max(self.timestep_histogram().values())
        raise ValueError(
            f"example_inputs(batch_size={batch_size}): no timestep has that many rows (largest group: "
            f"{largest}); use batch_size <= {largest}"
        )

    def subset(self, timesteps: Iterable[int | float] | torch.Tensor) -> CalibrationSet:
        """The rows whose timestep is one of ``timesteps`` (exact match), as a new set sharing metadata.

        Raises:
            ValueError: if ``timesteps`` is empty or names a timestep the set does not hold.
        """
        values = timesteps.flatten().tolist() if isinstance(timesteps, torch.Tensor) else list(timesteps)
        wanted = torch.as_tensor(values, dtype=self.timestep.dtype).flatten()
        if [float(v) for v in values] != wanted.tolist():
            raise ValueError(f"subset: timesteps {values} are not exact {self.timestep.dtype} values")
        if wanted.numel() == 0:
            raise ValueError("subset(timesteps=...) got no timesteps; pass at least one of calib.timesteps()")
        missing = [_as_number(t) for t in wanted if not bool((self.timestep == t).any())]
        if missing:
            raise ValueError(f"subset: timesteps {missing} are not in this set; available: {self.timesteps()}")
        keep = torch.isin(self.timestep, wanted)
        index = torch.nonzero(keep).flatten()
        picked = {name: value[index] for name, value in self._tensors().items()}
        return CalibrationSet(metadata=self.metadata, **picked)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the set to a safetensors file; :attr:`metadata` goes into the file's metadata dict.

        Raises:
            ValueError: if :attr:`metadata` uses a reserved ``qdiff_ao_format*`` key.
        """
        reserved = {_FORMAT_KEY, _VERSION_KEY, _SHA_KEY} & set(self.metadata)
        if reserved:
            raise ValueError(f"CalibrationSet.metadata must not contain reserved keys {sorted(reserved)}")
        tensors = {name: value.detach().cpu().contiguous() for name, value in self._tensors().items()}
        metadata = {**self.metadata, _FORMAT_KEY: _FORMAT_NAME, _VERSION_KEY: _VERSION,
                    _SHA_KEY: _tensors_sha256(tensors)}
        save_file(tensors, os.fspath(path), metadata=metadata)
        logger.info("saved %r to %s", self, os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CalibrationSet:
        """Read a set written by :meth:`save` (tensors on CPU).

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            ValueError: if the file is not a safetensors file written by :meth:`save`, or its tensors do not
                match the SHA-256 recorded at save time (a damaged file).
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CalibrationSet.load: no such file {path!r}")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"CalibrationSet.load: {path!r} is not a readable safetensors file ({exc})") from None
        if metadata.get(_FORMAT_KEY) != _FORMAT_NAME:
            raise ValueError(
                f"CalibrationSet.load: {path!r} is a safetensors file but not a qdiff_ao calibration set "
                f"(metadata {_FORMAT_KEY}={metadata.get(_FORMAT_KEY)!r}); write it with CalibrationSet.save"
            )
        if metadata.get(_VERSION_KEY) not in _READABLE_VERSIONS:
            raise ValueError(
                f"CalibrationSet.load: {path!r} has format version {metadata.get(_VERSION_KEY)!r}, this "
                f"qdiff_ao reads versions {list(_READABLE_VERSIONS)}"
            )
        recorded = metadata.pop(_SHA_KEY, None)
        if metadata[_VERSION_KEY] != "1" and recorded != _tensors_sha256(tensors):
            raise ValueError(
                f"CalibrationSet.load: {path!r} is damaged: its tensors' SHA-256 differs from the one recorded when "
                "it was saved; collect the calibration data again"
            )
        unknown = set(tensors) - {"sample", "timestep", *_OPTIONAL}
        if "sample" not in tensors or "timestep" not in tensors or unknown:
            raise ValueError(
                f"CalibrationSet.load: {path!r} holds tensors {sorted(tensors)}; expected 'sample', "
                f"'timestep' and optionally {list(_OPTIONAL)}"
            )
        metadata.pop(_FORMAT_KEY)
        metadata.pop(_VERSION_KEY)
        return cls(metadata=metadata, **tensors)


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_guidance_pairs(guidance_pair: torch.Tensor, metadata: dict[str, str]) -> None:
    """Refuse a ``guidance_pair`` tensor that is not integral, holds 0, or comes without a finite scale."""
    if guidance_pair.is_floating_point() or guidance_pair.dtype == torch.bool or guidance_pair.dim() != 1:
        raise ValueError(f"CalibrationSet: guidance_pair must be a 1-d integer tensor (-k unconditional, +k "
                         f"conditional row of pair k >= 1), got {guidance_pair.dtype} of shape "
                         f"{tuple(guidance_pair.shape)}")
    if bool((guidance_pair == 0).any()):
        raise ValueError("CalibrationSet: guidance_pair holds 0; pair ids are k >= 1 (-k unconditional, "
                         "+k conditional)")
    try:
        scale = float(metadata["guidance_scale"])
    except (KeyError, ValueError):
        raise ValueError("CalibrationSet: guidance_pair needs metadata['guidance_scale'] (a number, the scale s of "
                         f"y_u + s (y_c - y_u)), got {metadata.get('guidance_scale')!r}") from None
    if not math.isfinite(scale):
        raise ValueError(f"CalibrationSet: metadata['guidance_scale'] must be finite, got {scale}")


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
