"""Property-test kit for quantizers: check your own observers and fake-quant functions (and ours) with hypothesis.

Three lines in a user's test file (pytest; ``pip install qdiff_ao[test]``)::

    from qdiff_ao.testing import observer_properties
    from my_package import MyObserver
    test_my_observer = observer_properties(MyObserver, skip={"non_finite": "accepts NaN by design"})

or call the checks directly from any test::

    report = check_observer(MyObserver, per_channel=False, clips=True, max_examples=50)
    check_fake_quant(my_fake_quant)

A violated property raises ``PropertyViolation`` (an AssertionError) whose message names the property, says
what it demands and shows hypothesis' minimal counterexample. ``examples_run()`` counts the examples the kit
executed in this process. Strategies for writing further properties live in ``qdiff_ao.testing.strategies``.

Names are imported lazily, so importing this package (e.g. by the pytest plugin) does not import hypothesis.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "EXPLANATIONS",
    "FAKE_QUANT_PROPERTIES",
    "OBSERVER_PROPERTIES",
    "PropertyReport",
    "PropertyViolation",
    "check_fake_quant",
    "check_observer",
    "examples_run",
    "fake_quant_properties",
    "observer_properties",
    "strategies",
]

_HOME = {
    "EXPLANATIONS": "checks",
    "FAKE_QUANT_PROPERTIES": "checks",
    "OBSERVER_PROPERTIES": "checks",
    "check_fake_quant": "checks",
    "check_observer": "checks",
    "PropertyReport": "report",
    "PropertyViolation": "report",
    "examples_run": "report",
    "fake_quant_properties": "pytest_plugin",
    "observer_properties": "pytest_plugin",
}


def __getattr__(name: str) -> Any:
    if name == "strategies":
        return importlib.import_module("qdiff_ao.testing.strategies")
    if name in _HOME:
        return getattr(importlib.import_module(f"qdiff_ao.testing.{_HOME[name]}"), name)
    raise AttributeError(f"module 'qdiff_ao.testing' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
