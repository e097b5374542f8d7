"""Calibration prompts for text-to-image pipelines: a prompts file (one per line) or the shipped default set."""

from __future__ import annotations

from pathlib import Path

from qdiff_ao.app.model_source import MainJobError

__all__ = ["DEFAULT_PROMPTS_FILE", "read_prompts"]

DEFAULT_PROMPTS_FILE = Path(__file__).with_name("default_prompts.txt")
"""16 varied prompts shipped with the package, used when ``--prompts`` is not given."""


def read_prompts(path: Path | None) -> list[str]:
    """The non-blank lines of ``path`` (default: :data:`DEFAULT_PROMPTS_FILE`) that are not ``#`` comments.

    Raises:
        MainJobError: the file is missing, unreadable, not UTF-8 text, or holds no prompt.
    """
    path = DEFAULT_PROMPTS_FILE if path is None else Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MainJobError(f"--prompts {path} does not exist; give a UTF-8 text file with one prompt per line") \
            from None
    except (OSError, UnicodeDecodeError) as err:
        raise MainJobError(f"--prompts {path} is not a readable UTF-8 text file ({type(err).__name__}: {err})") \
            from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise MainJobError(f"--prompts {path} holds no prompt (only blank or '#' lines); write one prompt per line")
    return prompts
