"""Split shortcut quantization (Q-Diffusion Sec. 4.2): each half of a skip concat gets its own quantizers.

In a UNet decoder, ``cat([h, skip], dim=1)`` joins the upsampled features ``h`` and the encoder's skip features,
whose ranges differ by an order of magnitude (a bimodal distribution). One activation quantizer on the concat
wastes most of its grid on one half. This pass rewrites every conv that consumes such a concat:

        h ────┐                               h ──── conv.part0 (W[:, :Ca], bias) ──┐
              cat ──┬── conv ── y    ==>                                             add ── y
       skip ──┘     │                      skip ─── conv.part1 (W[:, Ca:], no bias) ─┘
                    └── norm1 ...          (the cat stays for its other users, e.g. GroupNorm, whose
                                            groups straddle the split)

so that after ``prepare_fx`` each part has its own activation observer and its own weight observer, and after
``convert_fx`` each part is a real quantized conv. In float the function is unchanged:
``conv(cat(a, b)) = conv_a(a) + conv_b(b)`` with W = [W_a | W_b] split along input channels, bias kept once.

The conv module at the original path becomes a :class:`SplitConv2d` holding ``part0`` and ``part1``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import cast

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from qdiff_ao.capture.graph_state import graph_info, has_graph_info, update_graph_info

__all__ = ["SplitConv2d", "SplitRecord", "SplitShortcutPass", "split_shortcut"]

logger = logging.getLogger(__name__)

_Pair = tuple[int, int]  # Conv2d stores kernel_size / stride / dilation as 2-tuples; torch types them tuple[int, ...]


@dataclass(frozen=True)
class SplitRecord:
    """One rewritten conv: the concat node, the conv's qualified name and the channels of each part."""

    cat_node: str
    conv: str
    split_index: int
    channels: tuple[int, int]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class SplitConv2d(nn.Module):
    """A Conv2d whose input channels are split in two parts, each its own conv: y = part0(x0) + part1(x1).

    Args:
        conv: the original conv (groups must be 1).
        split_index: number of input channels of the first part.
    """

    def __init__(self, conv: nn.Conv2d, split_index: int) -> None:
        super().__init__()
        if conv.groups != 1:
            raise ValueError(f"SplitConv2d needs groups=1, got groups={conv.groups}")
        if not 0 < split_index < conv.in_channels:
            raise ValueError(f"split_index must be in (0, {conv.in_channels}), got {split_index}")
        self.split_index = split_index
        sizes = (split_index, conv.in_channels - split_index)
        parts = []
        for i, (start, size) in enumerate(zip((0, split_index), sizes)):
            part = nn.Conv2d(
                size, conv.out_channels, cast(_Pair, conv.kernel_size), cast(_Pair, conv.stride),
                cast("str | _Pair", conv.padding), cast(_Pair, conv.dilation),
                bias=conv.bias is not None and i == 0, padding_mode=conv.padding_mode,
                device=conv.weight.device, dtype=conv.weight.dtype,
            )
            with torch.no_grad():
                part.weight.copy_(conv.weight[:, start:start + size])
                if part.bias is not None:
                    part.bias.copy_(cast(torch.Tensor, conv.bias))  # part0 has a bias only if conv has one
            parts.append(part)
        self.part0, self.part1 = parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.part0(x[:, : self.split_index]) + self.part1(x[:, self.split_index :])


def _channels(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return int(shape[1]) if shape is not None and len(shape) >= 2 else None


def _cat_parts(node: fx.Node) -> list[fx.Node] | None:
    """The two inputs of ``torch.cat([a, b], dim=1)``, or None if ``node`` is not such a concat."""
    if node.op != "call_function" or node.target is not torch.cat:
        return None
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2 or dim not in (1, -3):
        return None
    if not all(isinstance(t, fx.Node) for t in tensors):
        return None
    return list(tensors)


class SplitShortcutPass(PassBase):
    """Rewrite ``conv(cat([a, b], dim=1))`` into ``conv.part0(a) + conv.part1(b)``; idempotent."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[SplitRecord] = []

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        self.records = []
        for node in list(graph_module.graph.nodes):
            parts = _cat_parts(node)
            if parts is None:
                continue
            for user in list(node.users):
                match = self._match(graph_module, node, user, parts)
                if match is not None:
                    self._rewrite(graph_module, node, user, parts, match)
        modified = bool(self.records)
        if modified:
            graph_module.graph.eliminate_dead_code()
            graph_module.graph.lint()
            graph_module.recompile()
        recorded = graph_info(graph_module).splits if has_graph_info(graph_module) else None
        update_graph_info(graph_module, splits=(*(recorded or ()), *self.records))
        return PassResult(graph_module, modified)

    @staticmethod
    def _match(gm: fx.GraphModule, cat: fx.Node, user: fx.Node, parts: list[fx.Node]) -> int | None:
        """The split index if ``user`` is a groups=1 Conv2d taking ``cat`` as its input, else None."""
        if user.op != "call_module" or not user.args or user.args[0] is not cat or len(user.args) != 1:
            return None
        conv = gm.get_submodule(str(user.target))
        if type(conv) is not nn.Conv2d or conv.groups != 1:
            return None
        split = _channels(parts[0])
        if split is None:
            raise ValueError(
                f"split_shortcut needs the channel count of {parts[0].name!r} (input of {cat.name!r}); trace the "
                "model with qdiff_ao.trace, which records node.meta['tensor_meta'], or run "
                "torch.fx.passes.shape_prop.ShapeProp(gm).propagate(*example_inputs) first"
            )
        return split if 0 < split < conv.in_channels else None

    def _rewrite(self, gm: fx.GraphModule, cat: fx.Node, user: fx.Node, parts: list[fx.Node], split: int) -> None:
        target = str(user.target)
        conv = cast(nn.Conv2d, gm.get_submodule(target))  # checked by _match
        parent_name, _, leaf = target.rpartition(".")
        parent = gm.get_submodule(parent_name) if parent_name else gm
        setattr(parent, leaf, SplitConv2d(conv, split))
        graph = gm.graph
        with graph.inserting_before(user):
            y0 = graph.call_module(f"{target}.part0", (parts[0],))
            y1 = graph.call_module(f"{target}.part1", (parts[1],))
            total = graph.call_function(torch.add, (y0, y1))
        for new in (y0, y1, total):
            new.meta.update({k: v for k, v in user.meta.items() if k != "tensor_meta"})
        if "tensor_meta" in user.meta:
            total.meta["tensor_meta"] = user.meta["tensor_meta"]
        user.replace_all_uses_with(total)
        graph.erase_node(user)
        record = SplitRecord(cat.name, target, split, (split, conv.in_channels - split))
        logger.info("split_shortcut: %s split at channel %d of %d", target, split, conv.in_channels)
        self.records.append(record)


def split_shortcut(gm: fx.GraphModule) -> fx.GraphModule:
    """Apply :class:`SplitShortcutPass` in place and return ``gm``.

    The splits made are appended to ``graph_info(gm).splits`` (:class:`SplitRecord`: cat_node, conv,
    split_index, channels). Running it again changes nothing.
    """
    SplitShortcutPass()(gm)
    return gm
