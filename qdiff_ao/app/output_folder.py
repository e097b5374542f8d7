"""The main job's output folder, written whole into a staging folder and published in one step.

    OUT/.NAME.tmp-XXXX/   everything is written here first
    publish():  OUT exists? rename it to .NAME.old-XXXX;  rename the staging folder to OUT;  delete the old one

An interrupted run therefore leaves the previous output (or none) under OUT, never a mix of a new checkpoint and
an old report. The next run into the same OUT puts back a previous output that a kill between the two renames
left as ``.NAME.old-*`` and removes leftover staging and old folders (only folders holding nothing but our
entries). Replacing needs ``overwrite=True`` and is refused for a folder holding files qdiff-ao does not write.
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path

__all__ = ["KNOWN_ENTRIES", "StagedOutput", "check_output_target", "recover_interrupted_publish"]

# "checkpoint": the UNet checkpoint folder of outputs written before the pipeline folder existed.
KNOWN_ENTRIES = frozenset({"pipeline", "checkpoint", "report.json", "report.md", "samples_fp.png",
                           "samples_quantized.png", "activation_ranges.png", "split_histograms.png", "sensitivity.png"})


def _ours(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and {p.name for p in path.iterdir()} <= KNOWN_ENTRIES


def recover_interrupted_publish(out: Path) -> None:
    """Put back an output moved aside by a killed publish, and remove leftover old folders of ours."""
    if not out.parent.is_dir():
        return
    olds = [d for d in sorted(out.parent.glob(f".{out.name}.old-*")) if _ours(d)]
    if olds and not out.exists():
        olds.pop(0).rename(out)
    for d in olds:
        shutil.rmtree(d, ignore_errors=True)


def check_output_target(out: Path, overwrite: bool) -> None:
    """Raise ValueError unless ``out`` may receive a new output (see the module docstring)."""
    recover_interrupted_publish(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; name a folder (it is created if missing)")
    if not out.is_dir():
        return
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return
    foreign = sorted(entries - KNOWN_ENTRIES)
    if foreign:
        raise ValueError(f"--out {out} holds files qdiff-ao did not write ({foreign[:5]}); choose another --out, "
                         "so that nothing of yours is replaced")
    if not overwrite:
        raise ValueError(f"--out {out} holds the output of an earlier run; pass --overwrite to replace it or choose "
                         "another --out")


class StagedOutput:
    """A staging folder next to ``out``; :meth:`publish` moves it to ``out``, :meth:`discard` removes it."""

    def __init__(self, out: Path) -> None:
        self.out = out.expanduser().absolute()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.out.parent.glob(f".{self.out.name}.tmp-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        self.path = self.out.parent / f".{self.out.name}.tmp-{secrets.token_hex(4)}"
        self.path.mkdir()

    def publish(self) -> Path:
        """Move the staged folder to ``out`` (replacing an earlier output) and return ``out``."""
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{secrets.token_hex(4)}"
            self.out.rename(old)
        self.path.rename(self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
