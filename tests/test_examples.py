"""Smoke test: every example runs with its defaults (tiny models), or with tiny settings for the trainers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Example -> extra arguments keeping the run small. The trainers write to a temporary run folder and never
# export over the bundled artifacts.
ARGS: dict[str, list[str]] = {
    "ddpm_w4a8.py": ["--steps", "4", "--out", "{tmp}/ddpm_w4a8.png"],
    "calibration_drift.py": ["--steps", "6", "--timesteps", "3", "--out-dir", "{tmp}/drift"],
    "checkpoint_roundtrip.py": ["--out", "{tmp}/ckpt"],
    "custom_percentile_observer.py": ["--max-examples", "5"],
    "train_ddpm.py": ["--steps", "2", "--batch-size", "4", "--out", "{tmp}/run", "--no-export",
                      "--sample-every", "1000", "--ckpt-every", "1000"],
    "train_classifier.py": ["--report-only", "--samples", "50"],
}


def test_every_example_is_listed() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(ARGS)


@pytest.mark.parametrize("name", sorted(ARGS))
def test_example_runs(name: str, tmp_path: Path) -> None:
    args = [a.format(tmp=tmp_path) for a in ARGS[name]]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
