"""Files of a qdiff_ao checkpoint directory: atomic writing and verified reading, no pickle.

    <dir>/config.json          JSON: format, format_version, model description, and
                               tensors_bytes / tensors_sha256 of model.safetensors
    <dir>/model.safetensors    the tensors; header metadata: format, format_version and config_sha256,
                               the SHA-256 of config.json's content without the two tensors_* fields

Reading checks, in order: the directory and both files exist, config.json is our JSON, the format version is
known, model.safetensors has the recorded size and SHA-256 (any changed byte is detected), its header parses,
its config_sha256 equals the hash of the config content (a changed value in config.json is detected; changed
whitespace is harmless). Every failure raises :class:`CheckpointError` naming the file.

Writing goes to a fresh temporary directory next to the target, then renames it into place, so an interrupted
save leaves nothing under the final name. Replacing (``overwrite=True``) only happens when the existing
directory is a qdiff_ao checkpoint holding nothing but our two files, or is empty; it takes two renames (old away,
new in). A save killed between them is completed (or rolled back) by the next load or save of that path
(:func:`recover_interrupted_save`), which also removes the staging folders that killed saves leave behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from qdiff_ao.deploy.checkpoint.tensor_layout import CheckpointError

__all__ = ["CONFIG_FILE", "FORMAT", "FORMAT_VERSION", "READABLE_VERSIONS", "TENSORS_FILE", "read_checkpoint",
           "recover_interrupted_save", "write_checkpoint"]

logger = logging.getLogger(__name__)

FORMAT = "qdiff_ao.checkpoint"
FORMAT_VERSION = 5
"""Version 2 adds timestep groups (``config.json`` field ``timestep_groups`` and their qparam tensors); version 3
an output correction with input gains (``output_correction.input_gain``, read by no earlier version, which would
rebuild the graph without them); version 4 one with a denoised-spread term (``output_correction.spread``, the
prediction type, and ``num_train_timesteps``); version 5 a float tail (``float_tail.below``: the last timesteps
run with float activations, which an older reader would run on the integer graph). Each checkpoint is written
with the lowest version that describes it, so older readers keep reading what they can."""
READABLE_VERSIONS = (1, 2, 3, 4, 5)
CONFIG_FILE = "config.json"
TENSORS_FILE = "model.safetensors"
_OUR_FILES = {CONFIG_FILE, TENSORS_FILE}
_HASH_FIELDS = ("tensors_bytes", "tensors_sha256")


def _canonical(body: Mapping[str, Any]) -> bytes:
    content = {k: v for k, v in body.items() if k not in _HASH_FIELDS}
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _is_ours(path: Path) -> bool:
    try:
        body = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(body, dict) and body.get("format") == FORMAT


def _check_target(path: Path, overwrite: bool) -> bool:
    """True if ``path`` exists and may be replaced; raise if it may not."""
    if not path.exists() and not path.is_symlink():
        return False
    if not path.is_dir() or path.is_symlink():
        raise FileExistsError(f"{path} exists and is not a directory; choose another path for the checkpoint")
    entries = {p.name for p in path.iterdir()}
    if not entries:
        return True
    if not _is_ours(path):
        raise FileExistsError(
            f"{path} is a non-empty directory that is not a qdiff_ao checkpoint ({sorted(entries)[:5]}); "
            "save into a new or empty directory (nothing of yours is deleted)"
        )
    if not overwrite:
        raise FileExistsError(f"{path} already holds a qdiff_ao checkpoint; pass overwrite=True to replace it")
    if entries - _OUR_FILES:
        raise FileExistsError(
            f"{path} holds files that are not part of a qdiff_ao checkpoint ({sorted(entries - _OUR_FILES)}); "
            "move them away or save elsewhere (overwrite=True never deletes files it did not write)"
        )
    return True


def _remove_ours(path: Path) -> None:
    """Delete a directory that only holds our files (never anything else)."""
    for name in _OUR_FILES:
        (path / name).unlink(missing_ok=True)
    path.rmdir()


def _only_ours(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and {p.name for p in path.iterdir()} <= _OUR_FILES


def recover_interrupted_save(target: Path) -> None:
    """Finish or roll back a replacing save that was killed, and remove the leftovers of killed saves.

    A replacing save renames the old checkpoint to ``.NAME.old-X/previous``, then the complete new one from
    ``.NAME.tmp-Y`` to ``NAME``. Killed between the two renames, ``NAME`` is missing: the swap is completed when a
    complete new checkpoint is staged (both files written: the old one is only moved after that), else the old one
    is put back. Leftover staging folders are then removed, but only folders holding nothing but our two files.
    """
    parent = target.parent
    if not parent.is_dir():
        return
    staged = sorted(parent.glob(f".{target.name}.tmp-*"))
    previous = sorted(parent.glob(f".{target.name}.old-*"))
    if not target.exists():
        complete = [d for d in staged if _only_ours(d) and {p.name for p in d.iterdir()} == _OUR_FILES]
        olds = [d / "previous" for d in previous if _only_ours(d / "previous")]
        if complete and olds:
            os.rename(complete[0], target)
            logger.warning("completed an interrupted save of %s", target)
        elif olds:
            os.rename(olds[0], target)
            logger.warning("rolled back an interrupted save of %s to the previous checkpoint", target)
    for d in staged:
        if d.exists() and _only_ours(d):
            _remove_ours(d)
    for d in previous:
        if (d / "previous").exists() and _only_ours(d / "previous"):
            _remove_ours(d / "previous")
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


def _fresh_dir(target: Path, tag: str) -> Path:
    """A new hidden directory next to ``target`` (os.mkdir, so the user's umask applies, unlike mkdtemp's 0700)."""
    for _ in range(100):
        path = target.parent / f".{target.name}.{tag}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"could not create a temporary directory next to {target}")


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header keys sorted, so equal tensors give equal bytes.

    safetensors writes the ``__metadata__`` map in hash order, which changes from one process to the next; the
    header is rewritten as ``json.dumps(header, sort_keys=True)`` padded with spaces to a multiple of 8 bytes (the
    format's alignment), followed by the unchanged tensor data.
    """
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + size :]


def write_checkpoint(
    path: str | os.PathLike[str], body: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], *, overwrite: bool
) -> Path:
    """Write ``tensors`` and the JSON ``body`` as a checkpoint directory at ``path`` (atomically).

    Raises:
        FileExistsError: ``path`` exists and may not be replaced (see the module docstring).
    """
    target = Path(path).expanduser().absolute()
    recover_interrupted_save(target)
    replace = _check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    config_sha = hashlib.sha256(_canonical(body)).hexdigest()
    metadata = {"format": FORMAT, "format_version": str(body.get("format_version", FORMAT_VERSION)),
                "config_sha256": config_sha}
    data = _canonical_safetensors(_st_save(dict(tensors), metadata=metadata))
    full = {**body, "tensors_bytes": len(data), "tensors_sha256": hashlib.sha256(data).hexdigest()}
    text = json.dumps(full, indent=2, sort_keys=True, allow_nan=False) + "\n"
    tmp = _fresh_dir(target, "tmp")
    trash: Path | None = None
    try:
        _write_file(tmp / TENSORS_FILE, data)
        _write_file(tmp / CONFIG_FILE, text.encode())
        if replace:
            trash = _fresh_dir(target, "old")
            os.rename(target, trash / "previous")
        os.rename(tmp, target)
    except BaseException:
        if tmp.exists():
            _remove_ours(tmp)
        if trash is not None:
            if (trash / "previous").exists() and not target.exists():
                os.rename(trash / "previous", target)  # put the previous checkpoint back
            trash.rmdir()
        raise
    _fsync_dir(target.parent)
    if trash is not None:
        try:
            _remove_ours(trash / "previous")
            trash.rmdir()
        except OSError as err:  # something appeared in the old directory meanwhile: leave it for the user
            logger.warning("kept the previous checkpoint at %s: %s", trash, err)
    logger.info("saved checkpoint %s (%d tensors, %d bytes)", target, len(tensors), len(data))
    return target


def _header_metadata(data: bytes, filename: str) -> dict[str, str]:
    if len(data) < 8:
        raise CheckpointError(f"{filename}: file of {len(data)} bytes has no safetensors header")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise CheckpointError(f"{filename}: header length {size} exceeds the file ({len(data)} bytes)")
    try:
        header = json.loads(data[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{filename}: the safetensors header is not valid JSON ({err})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{filename}: the safetensors header has no qdiff_ao metadata")
    return meta


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and verify a checkpoint directory; returns (config body, tensors).

    Raises:
        CheckpointError: the directory is missing, not ours, of another format version, or a file is truncated,
            corrupted or inconsistent with the other.
    """
    root = Path(path).expanduser()
    recover_interrupted_save(root.absolute())
    config_path, tensors_path = root / CONFIG_FILE, root / TENSORS_FILE
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such checkpoint directory")
    if not config_path.is_file():
        raise CheckpointError(f"{root} is not a qdiff_ao checkpoint: {CONFIG_FILE} is missing")
    try:
        body = json.loads(config_path.read_bytes().decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err}); the file is corrupted") from None
    except RecursionError:  # nesting deeper than Python's parser recursion: no config of ours looks like that
        raise CheckpointError(f"{config_path}: JSON nested too deeply to be a qdiff_ao config") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        hint = " (it looks like a diffusers model folder)" if isinstance(body, dict) and "_class_name" in body else ""
        raise CheckpointError(f"{root} is not a qdiff_ao checkpoint{hint}: {CONFIG_FILE} lacks format={FORMAT!r}")
    version = body.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise CheckpointError(
            f"{config_path}: format_version {version!r} is not supported by this qdiff_ao (reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}); "
            f"it was written by qdiff_ao {body.get('library', {}).get('qdiff_ao', '?')}"
        )
    if not tensors_path.is_file():
        raise CheckpointError(f"{root}: {TENSORS_FILE} is missing")
    data = tensors_path.read_bytes()
    expected_size, expected_sha = body.get("tensors_bytes"), body.get("tensors_sha256")
    if not isinstance(expected_size, int) or not isinstance(expected_sha, str):
        raise CheckpointError(f"{config_path}: tensors_bytes / tensors_sha256 are missing or malformed")
    if len(data) != expected_size:
        what = "truncated" if len(data) < expected_size else "longer than written"
        raise CheckpointError(f"{tensors_path}: {what}: {len(data)} bytes, {CONFIG_FILE} records {expected_size}")
    if hashlib.sha256(data).hexdigest() != expected_sha:
        raise CheckpointError(
            f"{tensors_path}: SHA-256 differs from the one recorded in {CONFIG_FILE}; the file is corrupted or was "
            "modified after saving"
        )
    meta = _header_metadata(data, str(tensors_path))
    try:
        canonical = _canonical(body)
    except ValueError as err:
        raise CheckpointError(f"{config_path}: {err}") from None
    if meta.get("config_sha256") != hashlib.sha256(canonical).hexdigest():
        raise CheckpointError(
            f"{config_path}: its content does not match the config_sha256 recorded in {TENSORS_FILE}; the config "
            "is corrupted or was edited after saving"
        )
    if meta.get("format") != FORMAT or meta.get("format_version") != str(version):
        raise CheckpointError(f"{tensors_path}: format metadata {meta} does not match {CONFIG_FILE}")
    try:
        tensors = _st_load(data)
    except Exception as err:  # safetensors raises its own error types on malformed headers or offsets
        raise CheckpointError(f"{tensors_path}: cannot read the tensors ({type(err).__name__}: {err})") from None
    return body, tensors


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")
