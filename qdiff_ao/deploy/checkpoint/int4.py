"""Signed 4-bit weight codes packed two per byte, the storage of 4-bit checkpoints.

The byte holding codes ``q0`` and ``q1`` (each in [-8, 7]) is ``(q0 & 0xF) | (q1 & 0xF) << 4`` (low nibble first,
flat, an odd count padded with a zero nibble); unpacking sign-extends each nibble: ``v - 16 if v >= 8``.
"""

from __future__ import annotations

import torch

__all__ = ["INT4_RANGE", "pack_int4", "packed_padding", "unpack_int4"]

INT4_RANGE = (-8, 7)
"""(quant_min, quant_max) of a signed 4-bit code."""


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack signed 4-bit codes (an int8 tensor in [-8, 7]) two per byte: ``(q0 & 0xF) | (q1 & 0xF) << 4``.

    Returns a flat uint8 tensor of ``ceil(numel / 2)`` bytes; an odd count is padded with a zero nibble.

    Example:
        >>> pack_int4(torch.tensor([-8, 7, -1], dtype=torch.int8)).tolist()
        [120, 15]
    """
    if codes.dtype != torch.int8:
        raise TypeError(f"pack_int4 takes int8 codes, got {codes.dtype}")
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < INT4_RANGE[0] or int(flat.max()) > INT4_RANGE[1]):
        raise ValueError(
            f"pack_int4 takes codes in [-8, 7], got [{int(flat.min())}, {int(flat.max())}]; store them as int8"
        )
    nibbles = (flat.to(torch.int16) & 0xF).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 codes of ``shape`` (sign-extended nibbles, ``v - 16 if v >= 8``)."""
    numel = 1
    for size in shape:
        numel *= int(size)
    if packed.dtype != torch.uint8 or packed.shape != ((numel + 1) // 2,):
        raise ValueError(
            f"unpack_int4 needs a flat uint8 tensor of {(numel + 1) // 2} bytes for shape {tuple(shape)}, got "
            f"{packed.dtype} of shape {tuple(packed.shape)}"
        )
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:numel].to(torch.int16)
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8).reshape(shape)


def packed_padding(packed: torch.Tensor, shape: tuple[int, ...]) -> int:
    """The padding nibble of an odd-sized packed tensor (0 when there is none)."""
    numel = int(torch.Size(shape).numel())
    return int(packed[-1]) >> 4 if numel % 2 and packed.numel() else 0
