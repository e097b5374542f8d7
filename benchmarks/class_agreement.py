"""Class fidelity of a class-conditional zoo model's samples: the yardstick classifier's accuracy per class, its
agreement with the float samples of the same noise, and the most common changes of predicted class.

    python benchmarks/quality.py --model shapes16-cond --seeds 1 --only "=ours W4A8 (defaults)" --save-samples \
        --out OUT
    python benchmarks/class_agreement.py --fp OUT/fp_shapes16-cond_1x1000_ddim50.images.pt OUT/samples_*.pt

The FD ratio says *that* samples moved; this says whether they moved across classes (e.g. discs drawn as squares).
Sample ``j`` of each batch of ``--batch-size`` was asked for class ``j mod K`` (``qdiff_ao.app.zoo.sampling``).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qdiff_ao.app.zoo.shapes import SHAPE_CLASSES  # noqa: E402
from qdiff_ao.app.zoo.yardstick import ShapesFD  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapes16-cond")
    parser.add_argument("--fp", required=True, help="the float samples (.pt: a tensor, or quality.py's list of them)")
    parser.add_argument("--batch-size", type=int, default=100, help="the sampling batch (quality.py: 100)")
    parser.add_argument("samples", nargs="+", help="quantized samples (.pt) from the same noise")
    args = parser.parse_args()
    metric = ShapesFD.for_zoo(args.model)
    fp = torch.load(args.fp)
    fp = fp[0] if isinstance(fp, list) else fp
    k = len(SHAPE_CLASSES)
    labels = torch.arange(fp.shape[0]) % args.batch_size % k
    pred_fp = metric.predicted_classes(fp)

    def per_class(pred: torch.Tensor) -> str:
        return ", ".join(f"{name} {float((pred[labels == c] == c).float().mean()):.2f}"
                         for c, name in enumerate(SHAPE_CLASSES))

    print(f"FP: accuracy {float((pred_fp == labels).float().mean()):.3f} ({per_class(pred_fp)})")
    for path in args.samples:
        images = torch.load(path)
        pred = metric.predicted_classes(images)
        moves = Counter((SHAPE_CLASSES[a], SHAPE_CLASSES[b]) for a, b in zip(pred_fp.tolist(), pred.tolist()) if a != b)
        print(f"{Path(path).name}: accuracy {float((pred == labels).float().mean()):.3f} ({per_class(pred)}); "
              f"same class as FP {float((pred == pred_fp).float().mean()):.3f}; most common moves (FP -> this): "
              + ", ".join(f"{a}->{b} {n}" for (a, b), n in moves.most_common(4)))


if __name__ == "__main__":
    main()
