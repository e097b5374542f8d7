"""Shared pytest setup: the hypothesis profile for CI and a count of the examples hypothesis generated."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# CI profile: reproducible (derandomize) and free of timing flakiness (no deadline). QDIFF_HYPOTHESIS_EXAMPLES
# scales the number of examples per property (default 150).
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=int(os.environ.get("QDIFF_HYPOTHESIS_EXAMPLES", "150")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_EXAMPLES = {"count": 0}
_WORKER_EXAMPLES = {"count": 0}  # summed from the xdist workers' reports (controller only)


def _counting(inner):  # type: ignore[no-untyped-def]
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        _EXAMPLES["count"] += 1
        return inner(*args, **kwargs)

    return wrapper


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # hypothesis exposes the per-example function as `.hypothesis.inner_test` so that it can be wrapped.
    for item in items:
        fn = getattr(item, "obj", None)
        handle = getattr(fn, "hypothesis", None)
        if handle is not None and not getattr(handle.inner_test, "_qdiff_counted", False):
            handle.inner_test = _counting(handle.inner_test)
            handle.inner_test._qdiff_counted = True


def pytest_configure(config: pytest.Config) -> None:
    # Under pytest-xdist (scripts/test.sh runs `-n auto`: one worker per core) the cores are shared out between the
    # worker processes: each keeping torch's default of one thread per core would put 2N busy threads on N cores.
    # Tests that need a given thread count (the golden recipe, the distributed ranks) still set it themselves.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if os.environ.get("PYTEST_XDIST_WORKER") and workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def _examples_here() -> int:
    """Hypothesis examples generated in this process: the wrapped tests' and the property-test kit's own."""
    total = _EXAMPLES["count"]
    try:
        from qdiff_ao.testing import examples_run  # the property-test kit counts its own examples

        total += examples_run()
    except ImportError:
        pass
    return total


def pytest_sessionfinish(session: pytest.Session) -> None:
    output = getattr(session.config, "workeroutput", None)
    if output is not None:  # an xdist worker: the controller prints the summary, so hand it this worker's count
        output["hypothesis_examples"] = _examples_here()


@pytest.hookimpl(optionalhook=True)  # an xdist hook: absent (and never called) without pytest-xdist
def pytest_testnodedown(node: Any, error: Any) -> None:
    _WORKER_EXAMPLES["count"] += int(getattr(node, "workeroutput", {}).get("hypothesis_examples", 0))


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    total = _examples_here() + _WORKER_EXAMPLES["count"]
    terminalreporter.write_line(f"hypothesis: {total} generated examples ran in this session")


@pytest.fixture(scope="session")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], tuple[Any, Path]]:
    """(arch, scheme) -> (in-memory quantized UNet, its checkpoint directory), built once per test process (per
    pytest-xdist worker that needs it).

    Shared by tests/test_checkpoint.py and tests/test_checkpoint_validation.py (quantizing is the slow part).
    """
    from qdiff_ao import save
    from tests.checkpoint_helpers import _quantize

    cache: dict[tuple[str, str], tuple[Any, Path]] = {}

    def get(arch: str, scheme: str) -> tuple[Any, Path]:
        if (arch, scheme) not in cache:
            _, model = _quantize(arch, scheme)
            cache[arch, scheme] = model, save(model, tmp_path_factory.mktemp("ckpt") / f"{arch}-{scheme}")
        return cache[arch, scheme]

    return get
