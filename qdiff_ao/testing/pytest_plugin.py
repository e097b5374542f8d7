"""pytest integration of the property-test kit: one parametrised test per property, and an example count.

A user's whole test file::

    from qdiff_ao.testing import observer_properties
    from my_package import MyObserver
    test_my_observer = observer_properties(MyObserver, skip={"non_finite": "accepts NaN by design"})

pytest then collects ``test_my_observer[qparams]``, ``test_my_observer[range]``, ... ; properties switched off
show up as skipped with their reason. Keyword arguments are those of :func:`qdiff_ao.testing.check_observer`
(``fake_quant_properties`` does the same for :func:`qdiff_ao.testing.check_fake_quant`).

Installed as a pytest plugin (entry point ``pytest11``: ``qdiff_ao = "qdiff_ao.testing.pytest_plugin"``), the
module also prints, at the end of the session, how many hypothesis examples the kit ran. It imports neither
torch nor hypothesis until a kit test runs, so it costs nothing in unrelated test sessions.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import pytest

__all__ = ["observer_properties", "fake_quant_properties", "pytest_terminal_summary"]


def _parametrised(kind: str, target: Callable[..., Any], kwargs: dict[str, Any]) -> Callable[[str], None]:
    from qdiff_ao.testing import checks

    known = checks.OBSERVER_PROPERTIES if kind == "observer" else checks.FAKE_QUANT_PROPERTIES
    run = checks.check_observer if kind == "observer" else checks.check_fake_quant
    skip = dict(kwargs.pop("skip", None) or {})
    checks._validate(known, skip, kwargs.get("properties"))  # fail at collection, not once per property
    only = kwargs.pop("properties", None)
    names = [p for p in known if only is None or p in only]

    @pytest.mark.parametrize("qdiff_property", names)
    def test_property(qdiff_property: str) -> None:
        if qdiff_property in skip:
            pytest.skip(skip[qdiff_property])
        report = run(target, properties=[qdiff_property], **kwargs)
        if qdiff_property in report.skipped:
            pytest.skip(report.skipped[qdiff_property])

    test_property.__doc__ = f"{kind} properties of {getattr(target, '__qualname__', target)!s} (qdiff_ao.testing)"
    return test_property


def observer_properties(observer_factory: Callable[..., Any], **kwargs: Any) -> Callable[[str], None]:
    """A pytest test function, parametrised over ``OBSERVER_PROPERTIES``, that runs ``check_observer``.

    Args:
        observer_factory: as for ``check_observer``.
        **kwargs: ``check_observer``'s keyword arguments (``skip`` entries become pytest skips).

    Returns:
        The test function; assign it to a module-level name starting with ``test``.

    Raises:
        ValueError: at collection time, for an unknown property name or a skip without a reason.
    """
    return _parametrised("observer", observer_factory, dict(kwargs))


def fake_quant_properties(fake_quant_fn: Callable[..., Any], **kwargs: Any) -> Callable[[str], None]:
    """Like :func:`observer_properties`, for ``check_fake_quant`` and ``FAKE_QUANT_PROPERTIES``."""
    return _parametrised("fake_quant", fake_quant_fn, dict(kwargs))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print how many examples the kit ran (only if a kit check ran in this session)."""
    report = sys.modules.get("qdiff_ao.testing.report")
    if report is not None and report.examples_run():
        terminalreporter.write_line(f"qdiff_ao.testing: {report.examples_run()} property-test examples ran")
