"""What a property check returns or raises: ``PropertyReport``, ``PropertyViolation`` and the example counter."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["PropertyReport", "PropertyViolation", "Violation", "examples_run"]

_LOCK = threading.Lock()
_EXAMPLES_RUN = [0]
_DETAILED = 3  # violations shown in full in a PropertyViolation message


def examples_run() -> int:
    """Total number of hypothesis examples the kit has executed in this process (all checks together)."""
    return _EXAMPLES_RUN[0]


def _count_example() -> None:
    with _LOCK:
        _EXAMPLES_RUN[0] += 1


@dataclass(frozen=True)
class Violation:
    """One violated property: its name, what it demands in plain words, and hypothesis' minimal counterexample."""

    property: str
    explanation: str
    counterexample: str

    def render(self) -> str:
        body = "\n".join("    " + line for line in self.counterexample.splitlines())
        return f"property {self.property!r}: {self.explanation}\n  minimal counterexample:\n{body}"


class PropertyViolation(AssertionError):
    """A quantizer broke one or more properties; the message shows the smallest failing input hypothesis found.

    Attributes:
        property: the first violated property (in the kit's order).
        properties: all violated properties.
        violations: the ``Violation`` records.
        report: the ``PropertyReport`` of the whole run.
    """

    def __init__(self, target: str, violations: Sequence[Violation], report: PropertyReport) -> None:
        self.violations = tuple(violations)
        self.properties = tuple(v.property for v in self.violations)
        self.property = self.properties[0]
        self.report = report
        parts = [
            f"{target} violates {len(self.violations)} propert{'y' if len(self.violations) == 1 else 'ies'}: "
            f"{', '.join(self.properties)}"
        ]
        seen: dict[str, str] = {}
        for v in self.violations[:_DETAILED]:
            if v.counterexample in seen:
                parts.append(
                    f"property {v.property!r}: {v.explanation}\n  minimal counterexample: the same as for "
                    f"{seen[v.counterexample]!r}"
                )
            else:
                seen[v.counterexample] = v.property
                parts.append(v.render())
        if len(self.violations) > _DETAILED:
            rest = ", ".join(self.properties[_DETAILED:])
            parts.append(f"also violated: {rest} (counterexamples in .violations; often a consequence of the above)")
        super().__init__("\n".join(parts))


@dataclass
class PropertyReport:
    """What a check ran.

    Attributes:
        target: the quantizer under test.
        ran: properties that ran, in order.
        skipped: property -> reason, for properties switched off (by the caller or as not applicable).
        examples: property -> hypothesis examples executed (shrinking included).
        seconds: property -> wall-clock seconds.
        violations: the violated properties (empty when the check passed; a failing check raises).
    """

    target: str
    ran: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)

    @property
    def total_examples(self) -> int:
        return sum(self.examples.values())

    def summary(self) -> str:
        lines = [f"{self.target}: {len(self.ran)} properties ran, {self.total_examples} examples"]
        lines += [
            f"  ran      {p:<17} {self.examples.get(p, 0):>6} examples {self.seconds.get(p, 0.0):7.2f} s"
            for p in self.ran
        ]
        lines += [f"  skipped  {p:<17} {reason}" for p, reason in self.skipped.items()]
        lines += [f"  VIOLATED {v.property}" for v in self.violations]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


class _Fail(AssertionError):
    """Raised inside a property body; carries the human-readable counterexample."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def fmt_tensor(x: torch.Tensor, limit: int = 16) -> str:
    """``shape (2, 3) float32 [v0, v1, ...]`` with float values shown exactly (9 significant digits)."""
    flat = x.detach().reshape(-1)
    vals = flat[:limit].tolist()
    if x.is_floating_point():
        shown = ", ".join(f"{v:.9g}" for v in vals)
    else:
        shown = ", ".join(str(v) for v in vals)
    more = f", ... ({flat.numel() - limit} more)" if flat.numel() > limit else ""
    return f"shape {tuple(x.shape)} {str(x.dtype).replace('torch.', '')} [{shown}{more}]"
