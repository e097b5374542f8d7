"""Train the shape classifier behind a zoo model's FD, store its reference statistics, report floor/ceilings.

The classifier (:class:`qdiff_ao.app.zoo.yardstick.ShapesClassifier`) learns the shape class of fresh
procedural images (``make_shapes(batch, size, seed=...)``, seeds disjoint from the DDPM's and from the
reference set). The reference statistics are its features of the 2,000 reference images. The report measures
the FD scale at ``--samples`` images: floor (other real images), ceilings (uniform noise, samples of an
untrained UNet) and the trained FP model's DDIM-50 samples.

    python examples/train_zoo_classifier.py shapes32        # ~3 min on one thread
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F

from qdiff_ao.app.metrics import feature_statistics
from qdiff_ao.app.zoo.registry import ZOO, zoo_entry
from qdiff_ao.app.zoo.sampling import zoo_sample
from qdiff_ao.app.zoo.shapes import make_shapes
from qdiff_ao.app.zoo.yardstick import CLASSIFIER_FILE, REFERENCE_SEED, REFERENCE_SIZE, ShapesClassifier, ShapesFD

logger = logging.getLogger("train_zoo_classifier")
_TRAIN_SEED_OFFSET = 5_000_011
_FLOOR_SEED = 11


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=sorted(ZOO))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="classifier file (default: <zoo folder>/"
                    f"{CLASSIFIER_FILE})")
    ap.add_argument("--no-report", action="store_true", help="skip the FD scale report (test runs)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    entry = zoo_entry(args.model)
    model = ShapesClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.steps)
    for step in range(args.steps):
        x, y = make_shapes(args.batch_size, entry.image_size, seed=_TRAIN_SEED_OFFSET + step)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 250 == 0:
            logger.info("step %d loss %.4f", step + 1, loss.item())
    model.eval()
    ref, ref_labels = make_shapes(REFERENCE_SIZE, entry.image_size, seed=REFERENCE_SEED)
    with torch.no_grad():
        mu, sigma = feature_statistics(model.features(ref))
    metric = ShapesFD(model, mu, sigma, entry.image_size)
    out = args.out or entry.folder / CLASSIFIER_FILE
    metric.save(out)
    logger.info("reference accuracy %.4f; wrote %s", metric.accuracy(ref, ref_labels), out)
    if args.no_report:
        return
    n = args.samples
    floor, _ = make_shapes(n, entry.image_size, seed=_FLOOR_SEED)
    noise = torch.rand(n, 3, entry.image_size, entry.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.manual_seed(0)
    untrained = getattr(diffusers, entry.unet_class)(**entry.unet_config).eval()
    rows = [(f"FLOOR: {n} other real images", metric.fd(floor)),
            (f"CEILING: {n} uniform-noise images", metric.fd(noise)),
            (f"CEILING: {n} untrained-UNet samples", metric.fd(zoo_sample(entry.name, n, unet=untrained,
                                                                           progress=False))),
            (f"FP {entry.name}, {n} DDIM-50 samples", metric.fd(zoo_sample(entry.name, n, progress=False)))]
    for name, fd in rows:
        logger.info("%-44s %10.3f", name, fd)


if __name__ == "__main__":
    main()
