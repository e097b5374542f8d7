"""Train the digit classifier behind the digits FD, store the reference statistics, report floor/ceilings.

A small CNN (:class:`qdiff_ao.app.metrics.DigitClassifier`) is trained on the 1,497 training digits (16x16,
seeded, random shifts of up to 2 pixels as the only augmentation: digits must not be flipped). Its
penultimate features of the 300 held-out digits give the reference ``(mu, Sigma)``; both go to
``qdiff_ao/app/bundled/digits_classifier.safetensors``. The report then measures the FD scale:

- floor: 300 training digits vs the held-out reference (two real sets of the same size);
- ceilings: uniform noise images, and DDIM-50 samples of an untrained UNet of the bundled architecture;
- the bundled FP DDPM's DDIM-50 samples, when the model has been trained.

    python examples/train_classifier.py              # train (~1 min on one thread) + report
    python examples/train_classifier.py --report-only
"""

from __future__ import annotations

import argparse
import logging
import math

import torch
import torch.nn.functional as F
from diffusers import DDIMPipeline, DDPMScheduler, UNet2DModel

from qdiff_ao.app.bundled import CLASSIFIER_FILE, DIGITS_DDPM_DIR, load_digits_tensor
from qdiff_ao.app.metrics import DigitClassifier, DigitsFD, feature_statistics

logger = logging.getLogger("train_classifier")


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with the background value -1."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen)).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def train(epochs: int, batch_size: int, lr: float, seed: int) -> DigitClassifier:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = load_digits_tensor("train", with_labels=True)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for idx in order.split(batch_size):
            loss = F.cross_entropy(model(random_shift(x[idx], 2, gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 5 == 0:
            logger.info("epoch %d loss %.4f", epoch + 1, total / len(x))
    return model.eval()


def ddim_samples(unet: UNet2DModel, n: int, seed: int) -> torch.Tensor:
    """``n`` DDIM-50 samples in [-1, 1] (diffusers' DDIMPipeline returns them in [0, 1], NHWC)."""
    scheduler = DDPMScheduler.from_pretrained(DIGITS_DDPM_DIR, subfolder="scheduler")
    pipe = DDIMPipeline(unet=unet.eval(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=n, generator=torch.Generator().manual_seed(seed), num_inference_steps=50,
               output_type="np").images
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() * 2 - 1


def report(metric: DigitsFD, n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    heldout, labels = load_digits_tensor("heldout", with_labels=True)
    train_x = load_digits_tensor("train")
    train_sub = train_x[torch.randperm(len(train_x), generator=gen)[:n]]
    noise = torch.rand(n, 1, 16, 16, generator=gen) * 2 - 1
    rows = [("held-out accuracy", metric.accuracy(heldout, labels), float("nan")),
            ("held-out (reference itself)", metric.fd(heldout), metric.mean_confidence(heldout)),
            (f"FLOOR: {n} train digits", metric.fd(train_sub), metric.mean_confidence(train_sub)),
            (f"CEILING: {n} uniform-noise images", metric.fd(noise), metric.mean_confidence(noise))]
    if (DIGITS_DDPM_DIR / "unet").is_dir():
        config = UNet2DModel.load_config(DIGITS_DDPM_DIR, subfolder="unet")
        torch.manual_seed(seed)
        untrained = ddim_samples(UNet2DModel.from_config(config), n, seed)
        rows.append((f"CEILING: {n} untrained-UNet samples", metric.fd(untrained), metric.mean_confidence(untrained)))
        fp = ddim_samples(UNet2DModel.from_pretrained(DIGITS_DDPM_DIR, subfolder="unet"), n, seed)
        rows.append((f"FP bundled DDPM, {n} DDIM-50 samples", metric.fd(fp), metric.mean_confidence(fp)))
    else:
        logger.info("no bundled DDPM at %s yet: skipping the UNet rows", DIGITS_DDPM_DIR)
    logger.info("%-40s %12s %10s", "set", "FD", "confidence")
    for name, fd, conf in rows:
        logger.info("%-40s %12.4f %10.4f", name, fd, conf)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samples", type=int, default=300, help="images per set in the FD report")
    ap.add_argument("--report-only", action="store_true", help="use the bundled classifier, do not retrain")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.report_only:
        metric = DigitsFD.from_bundled()
    else:
        model = train(args.epochs, args.batch_size, args.lr, args.seed)
        heldout, labels = load_digits_tensor("heldout", with_labels=True)
        with torch.no_grad():
            mu, sigma = feature_statistics(model.features(heldout))
        metric = DigitsFD(model, mu, sigma)
        acc = metric.accuracy(heldout, labels)
        metric.save(CLASSIFIER_FILE, metadata={"heldout_accuracy": acc, "epochs": args.epochs, "seed": args.seed,
                                               "reference": "heldout split, 300 images, features pre-ReLU fc1"})
        logger.info("held-out accuracy %.4f; wrote %s", acc, CLASSIFIER_FILE)
    report(metric, args.samples, args.seed)


if __name__ == "__main__":
    main()
