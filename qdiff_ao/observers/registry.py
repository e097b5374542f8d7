"""Observer registry: users register their own observer class by name and select it through ``QuantConfig``.

Example:
    >>> import torch
    >>> from qdiff_ao.observers import RangeMinMaxObserver
    >>> @register_observer("my_minmax_example")
    ... class MyMinMax(RangeMinMaxObserver):
    ...     pass
    >>> get_observer("my_minmax_example") is MyMinMax
    True
    >>> unregister_observer("my_minmax_example")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from qdiff_ao._compat import ObserverBase

__all__ = ["register_observer", "get_observer", "list_observers", "unregister_observer"]

T = TypeVar("T", bound=type)

_OBSERVERS: dict[str, type[ObserverBase]] = {}


def register_observer(name: str) -> Callable[[T], T]:
    """Class decorator registering an ``ObserverBase`` subclass under ``name``.

    The class must accept the torch.ao keyword arguments ``dtype``, ``qscheme``, ``quant_min``, ``quant_max``
    (and ``ch_axis`` for weight observers); :func:`qdiff_ao.get_qconfig_mapping` passes them.

    Raises:
        ValueError: if ``name`` is already taken.
        TypeError: if the class is not a torch.ao ``ObserverBase`` subclass.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"observer name must be a non-empty string, got {name!r}")

    def deco(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, ObserverBase)):
            raise TypeError(f"register_observer({name!r}) needs an ObserverBase subclass, got {cls!r}")
        if name in _OBSERVERS:
            raise ValueError(
                f"observer {name!r} is already registered ({_OBSERVERS[name].__qualname__}); pick another name "
                "or call unregister_observer first"
            )
        _OBSERVERS[name] = cls
        return cls

    return deco


def get_observer(name: str) -> type[ObserverBase]:
    """The class registered under ``name``.

    Raises:
        KeyError: naming the registered observers, if ``name`` is unknown.
    """
    try:
        return _OBSERVERS[name]
    except KeyError:
        raise KeyError(f"no observer registered as {name!r}; registered: {sorted(_OBSERVERS)}") from None


def list_observers() -> list[str]:
    """Names of all registered observers, sorted."""
    return sorted(_OBSERVERS)


def unregister_observer(name: str) -> None:
    """Remove ``name`` from the registry (KeyError if absent)."""
    get_observer(name)
    del _OBSERVERS[name]
