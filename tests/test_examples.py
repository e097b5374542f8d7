"""Smoke test: every example runs once, with its defaults (tiny models) or tiny settings, as a subprocess.

Each run pays ~5 s of interpreter and torch start-up. Runs that still take more than the slow marker's 10 s on
this project's 2-core machines are marked slow (their code paths are covered in the default run by unit tests:
ddpm_w4a8.py's raw torch.ao path by tests/test_raw_torch_ao_path.py).
"""

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
    "ddpm_w4a8.py": ["--steps", "2", "--out", "{tmp}/ddpm_w4a8.png"],
    "calibration_drift.py": ["--steps", "4", "--timesteps", "2", "--out-dir", "{tmp}/drift"],
    "checkpoint_roundtrip.py": ["--out", "{tmp}/ckpt"],
    "custom_percentile_observer.py": ["--max-examples", "5"],
    "train_ddpm.py": ["--steps", "2", "--batch-size", "4", "--out", "{tmp}/run", "--no-export",
                      "--sample-every", "1000", "--ckpt-every", "1000"],
    "train_classifier.py": ["--report-only", "--samples", "16"],
    "train_zoo.py": ["shapes16-cond", "--steps", "2", "--out", "{tmp}/zoo", "--no-export", "--ckpt-every", "1000"],
    "train_zoo_classifier.py": ["shapes32", "--steps", "2", "--out", "{tmp}/clf.safetensors", "--no-report"],
}
SLOW = {"ddpm_w4a8.py"}  # 11-12 s with --steps 2 (bundled model, TorchScript freezing, two samplings)


def test_every_example_is_listed() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(ARGS)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(ARGS)])
def test_example_runs(name: str, tmp_path: Path) -> None:
    args = [a.format(tmp=tmp_path) for a in ARGS[name]]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
