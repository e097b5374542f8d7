"""Procedural RGB images of coloured shapes: the data of the model-zoo DDPMs (nothing is downloaded).

Each image has a smooth two-colour background gradient and one foreground shape of a random colour, centre,
size and rotation. The shape's class (the label) is one of :data:`SHAPE_CLASSES`. Shapes are drawn from a
signed distance ``d(p)`` (negative inside) with an anti-aliased edge::

    alpha(p) = sigmoid(-d(p) / softness)          softness = 0.6 pixel
    image    = alpha * colour + (1 - alpha) * background

so images are smooth like natural images (no aliasing the DDPM would have to learn exactly). Values lie in
``[-1, 1]``. Generation is a pure function of ``(n, size, seed)``: the same call gives the same tensor on any
machine (one ``torch.Generator``, float32 arithmetic only).
"""

from __future__ import annotations

import math

import torch

__all__ = ["SHAPE_CLASSES", "make_shapes"]

SHAPE_CLASSES = ("disc", "square", "triangle", "ring", "cross", "stripes")
"""Names of the foreground-shape classes, in label order."""

_SOFTNESS = 0.6


def _signed_distance(kind: int, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels, negative inside) of shape ``kind`` of radius ``r`` in rotated coordinates."""
    if kind == 0:  # disc
        return torch.sqrt(u * u + v * v) - r
    if kind == 1:  # square of half-side r
        return torch.maximum(u.abs(), v.abs()) - r
    if kind == 2:  # equilateral triangle of inradius r / 2 (three half-planes)
        d = v - r / 2
        for angle in (2 * math.pi / 3, 4 * math.pi / 3):
            d = torch.maximum(d, -math.sin(angle) * u + math.cos(angle) * v - r / 2)
        return d
    if kind == 3:  # ring of radius 0.75 r and width 0.5 r
        return (torch.sqrt(u * u + v * v) - 0.75 * r).abs() - 0.25 * r
    if kind == 4:  # plus-shaped cross, arms of half-width r / 3
        arm_h = torch.maximum(u.abs() - r, v.abs() - r / 3)
        arm_v = torch.maximum(v.abs() - r, u.abs() - r / 3)
        return torch.minimum(arm_h, arm_v)
    # stripes inside a disc: period r, clipped to the disc
    stripe = (torch.remainder(u, r) - r / 2).abs() - r / 4
    return torch.maximum(stripe, torch.sqrt(u * u + v * v) - r)


def make_shapes(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` shape images ``(n, 3, size, size)`` in ``[-1, 1]`` and their labels ``(n,)`` (int64).

    Args:
        n: number of images (>= 1).
        size: image side in pixels (>= 8).
        seed: generator seed; equal seeds give equal images.

    Raises:
        ValueError: if ``n`` or ``size`` is out of range.

    Example:
        >>> x, y = make_shapes(4, size=16, seed=1)
        >>> tuple(x.shape), tuple(y.shape), bool(x.abs().max() <= 1)
        ((4, 3, 16, 16), (4,), True)
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(SHAPE_CLASSES), (n,), generator=gen)
    bg_a, bg_b, fg = (torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1 for _ in range(3))
    # Keep the shape visible: push its colour away from the background mean by at least 0.6 on one channel.
    bg_mean = (bg_a + bg_b) / 2
    gap = fg - bg_mean
    weak = gap.abs().amax(dim=1, keepdim=True) < 0.6
    fg = torch.where(weak, (bg_mean - 0.8 * torch.sign(bg_mean + 1e-6)).clamp(-1, 1), fg)
    angle_bg = torch.rand(n, 1, 1, 1, generator=gen) * 2 * math.pi
    cx, cy = ((torch.rand(n, 1, 1, generator=gen) * 0.5 + 0.25) * size for _ in range(2))
    radius = (torch.rand(n, 1, 1, generator=gen) * 0.18 + 0.16) * size
    theta = torch.rand(n, 1, 1, generator=gen) * 2 * math.pi

    coords = torch.arange(size, dtype=torch.float32) + 0.5
    py, px = torch.meshgrid(coords, coords, indexing="ij")
    px, py = px.expand(n, size, size), py.expand(n, size, size)
    # Background: linear gradient from bg_a to bg_b along a random direction.
    proj = ((px - size / 2) * torch.cos(angle_bg[:, 0]) + (py - size / 2) * torch.sin(angle_bg[:, 0])) / size + 0.5
    w = proj.clamp(0, 1).unsqueeze(1)
    background = bg_a * (1 - w) + bg_b * w
    du, dv = px - cx, py - cy
    u = du * torch.cos(theta) + dv * torch.sin(theta)
    v = -du * torch.sin(theta) + dv * torch.cos(theta)
    dist = torch.empty(n, size, size)
    for kind in range(len(SHAPE_CLASSES)):
        members = labels == kind
        if members.any():
            dist[members] = _signed_distance(kind, u[members], v[members], radius[members])
    alpha = torch.sigmoid(-dist / _SOFTNESS).unsqueeze(1)
    images = alpha * fg + (1 - alpha) * background
    return images.clamp(-1, 1), labels
