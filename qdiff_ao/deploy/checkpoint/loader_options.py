"""The keywords diffusers' pipeline loader passes to a model component, checked against what a qdiff_ao checkpoint
(integer weights, float32 inputs and outputs, CPU) can honour, so none is silently ignored."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["check_loader_options"]

# What diffusers' loader may pass to a model component, and the values a float32-I/O CPU checkpoint honours
# (None everywhere means "not asked for").
_LOADER_OPTIONS: dict[str, tuple[Any, ...]] = {
    "torch_dtype": (None, torch.float32),
    "dtype": (None, torch.float32),
    "device_map": (None, "cpu"),
    "variant": (None,),
    "use_safetensors": (None, True),
    "use_flashpack": (None, False),
    "quantization_config": (None,),
    "max_memory": (None,),
    "offload_folder": (None,),
    "offload_state_dict": (None, False, True),
    "low_cpu_mem_usage": (None, False, True),
    "disable_mmap": (None, False, True),
}


def check_loader_options(options: dict[str, Any]) -> None:
    """Refuse loader keywords that would otherwise be silently ignored (a dtype, a GPU device map, a variant).

    Raises:
        TypeError: an unknown keyword.
        ValueError: a known keyword at a value this checkpoint cannot honour.
    """
    for name, value in options.items():
        if name not in _LOADER_OPTIONS:
            raise TypeError(f"QuantizedUNet.from_pretrained got an unexpected keyword {name!r}; it accepts "
                            f"{sorted(_LOADER_OPTIONS)} (the keywords diffusers' pipeline loader passes)")
        if not any(value is ok or value == ok for ok in _LOADER_OPTIONS[name]):
            raise ValueError(
                f"QuantizedUNet.from_pretrained: {name}={value!r} cannot be honoured: the checkpoint holds integer "
                f"weights with float32 inputs and outputs for the CPU ({name} may be "
                f"{[v for v in _LOADER_OPTIONS[name]]}); drop {name} from the from_pretrained call"
            )
