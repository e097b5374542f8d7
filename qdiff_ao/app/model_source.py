"""What ``qdiff-ao quantize --model DIR`` reads: a diffusers pipeline folder or a ``unet/`` + ``scheduler/`` folder.

Two kinds of model are supported, told apart by the UNet class and the components beside it:

* **unconditional**: a ``UNet2DModel`` with a scheduler, as a bare ``unet/`` + ``scheduler/`` folder or a
  ``DDPMPipeline`` / ``DDIMPipeline`` folder (``model_index.json``);
* **text-to-image**: a ``StableDiffusionPipeline``-shaped folder (``UNet2DConditionModel`` with cross-attention,
  ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``); calibration runs its own sampler on prompts.

Every check (folder layout, ``model_index.json``, each component present, classes known, configs readable) runs
before any weights load, so a bad folder costs nothing and writes nothing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
from diffusers.utils import logging as diffusers_logging

from qdiff_ao.app.bundled import DIGITS_DDPM_DIR

__all__ = ["MainJobError", "ModelSource", "PIPELINE_KINDS", "load_model_folder", "load_model_source"]

PIPELINE_KINDS: dict[str, str] = {
    "DDPMPipeline": "unconditional",
    "DDIMPipeline": "unconditional",
    "StableDiffusionPipeline": "text-to-image",
}
"""Pipeline classes read from ``model_index.json`` and the kind of model each holds."""

_UNET_CLASS = {"unconditional": "UNet2DModel", "text-to-image": "UNet2DConditionModel"}
_TEXT_COMPONENTS = ("vae", "text_encoder", "tokenizer")


class MainJobError(ValueError):
    """A problem with the command's input (paths, model kind), reported without a traceback."""


@dataclass
class ModelSource:
    """A loaded model folder.

    Attributes:
        name: how reports name it (the folder path, or "bundled digits DDPM").
        root: the folder.
        kind: "unconditional" or "text-to-image".
        unet, scheduler: the float UNet (eval mode) and its scheduler.
        pipeline: the loaded diffusers pipeline (None for a bare unet/ + scheduler/ folder).
        model_index: ``model_index.json`` of a pipeline folder, or None.
    """

    name: str
    root: Path
    kind: str
    unet: Any
    scheduler: Any
    pipeline: Any = None
    model_index: dict[str, Any] | None = None

    @property
    def pipeline_class(self) -> str:
        """The pipeline class the quantized output folder names (a bare folder becomes a DDIM/DDPM pipeline)."""
        if self.model_index is not None:
            return str(self.model_index["_class_name"])
        return "DDIMPipeline" if isinstance(self.scheduler, diffusers.DDIMScheduler) else "DDPMPipeline"

    def components(self) -> dict[str, list[Any]]:
        """{component name: [library, class]} of every non-empty component besides the UNet."""
        if self.model_index is None:
            return {"scheduler": ["diffusers", type(self.scheduler).__name__]}
        return {k: v for k, v in self.model_index.items()
                if not k.startswith("_") and k != "unet" and isinstance(v, list) and v[0] is not None}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MainJobError(f"{path} is missing; expected a diffusers model folder") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise MainJobError(f"{path} is not a readable JSON config ({type(err).__name__}: {err})") from None
    if not isinstance(value, dict):
        raise MainJobError(f"{path} holds a JSON {type(value).__name__}, not a config object")
    return value


def _check_unet_class(root: Path, expected: str, kind: str) -> None:
    found = _read_json(root / "unet" / "config.json").get("_class_name")
    if found != expected:
        raise MainJobError(f"{root / 'unet'} holds a {found!r}; a {kind} model needs a {expected}")


def _scheduler_class(root: Path) -> type:
    sched_cfg = _read_json(root / "scheduler" / "scheduler_config.json")
    sched_cls = getattr(diffusers, str(sched_cfg.get("_class_name")), None)
    if not (isinstance(sched_cls, type) and issubclass(sched_cls, diffusers.SchedulerMixin)):
        raise MainJobError(f"unknown scheduler class {sched_cfg.get('_class_name')!r} in {root / 'scheduler'}")
    return sched_cls


def _check_pipeline_folder(root: Path) -> tuple[dict[str, Any], str]:
    """(model_index, kind) after checking the pipeline class and that every named component is there."""
    index = _read_json(root / "model_index.json")
    cls_name = index.get("_class_name")
    kind = PIPELINE_KINDS.get(str(cls_name))
    if kind is None:
        raise MainJobError(
            f"{root / 'model_index.json'} names the pipeline class {cls_name!r}, which qdiff-ao quantize does not "
            f"support; supported: {sorted(PIPELINE_KINDS)} (other UNets: quantize them from Python with "
            "qdiff_ao.quantize)"
        )
    required = ("unet", "scheduler") + (_TEXT_COMPONENTS if kind == "text-to-image" else ())
    for name in required:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] is not None):
            raise MainJobError(f"{root / 'model_index.json'}: a {cls_name} needs the component {name!r}, "
                               f"got {entry!r}")
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[:1] == [None]:
            continue
        if not (root / name).is_dir():
            raise MainJobError(f"{root} has no {name}/ folder, but model_index.json lists the component "
                               f"{name!r} ({entry}); the pipeline folder is incomplete")
    if kind == "text-to-image" and importlib.util.find_spec("transformers") is None:
        raise MainJobError("a text-to-image pipeline needs `transformers` for its text encoder and tokenizer: "
                           "pip install 'qdiff-ao[pipelines]'")
    _check_unet_class(root, _UNET_CLASS[kind], kind)
    _scheduler_class(root)
    return index, kind


@contextlib.contextmanager
def _quiet_diffusers_loading() -> Iterator[None]:
    """No "Loading pipeline components" bar (it would precede a clean error message on stderr)."""
    was_enabled = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            diffusers_logging.enable_progress_bar()


def load_model_source(path: Path | None) -> ModelSource:
    """Check, then load, the model folder ``path`` (None: the bundled digits DDPM).

    Raises:
        MainJobError: the folder is missing or incomplete, names an unsupported pipeline or UNet class, holds an
            unreadable config, or its weights do not load.
    """
    name = "bundled digits DDPM" if path is None else str(path)
    root = Path(DIGITS_DDPM_DIR if path is None else path)
    if not root.is_dir():
        raise MainJobError(f"model folder {root} does not exist (expected a diffusers pipeline folder with "
                           "model_index.json, or a folder with unet/ and scheduler/)")
    if (root / "model_index.json").is_file():
        index, kind = _check_pipeline_folder(root)
        try:
            with _quiet_diffusers_loading():
                # str path: diffusers records the load path in configs, which must stay JSON-serialisable.
                pipeline = diffusers.DiffusionPipeline.from_pretrained(str(root))
        except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError) as err:
            raise MainJobError(f"cannot load the model (pipeline) in {root}: {type(err).__name__}: {err}") from None
        pipeline.set_progress_bar_config(disable=True)
        return ModelSource(name, root, kind, pipeline.unet.eval(), pipeline.scheduler, pipeline, index)
    for sub in ("unet", "scheduler"):
        if not (root / sub).is_dir():
            hint = " (train it with examples/train_ddpm.py)" if path is None else ""
            raise MainJobError(f"{root} has no {sub}/ subfolder{hint} and no model_index.json; expected a "
                               "diffusers pipeline folder")
    _check_unet_class(root, "UNet2DModel", "unconditional")
    sched_cls = _scheduler_class(root)
    try:
        unet = diffusers.UNet2DModel.from_pretrained(str(root / "unet")).eval()
        scheduler = sched_cls.from_pretrained(str(root / "scheduler"))  # type: ignore[attr-defined]
    except (OSError, ValueError, TypeError, KeyError) as err:  # missing weights, a config diffusers refuses
        raise MainJobError(f"cannot load the model in {root}: {type(err).__name__}: {err}") from None
    return ModelSource(name, root, "unconditional", unet, scheduler)


def load_model_folder(path: Path | None) -> tuple[Any, Any, str]:
    """(unet, scheduler, name) of an unconditional model folder (see :func:`load_model_source`).

    Raises:
        MainJobError: as :func:`load_model_source`, or the folder holds a text-to-image pipeline.
    """
    source = load_model_source(path)
    if source.kind != "unconditional":
        raise MainJobError(f"{source.root} holds a {source.kind} pipeline; this needs an unconditional model")
    return source.unet, source.scheduler, source.name
