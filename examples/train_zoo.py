"""Train a model-zoo DDPM (``qdiff_ao.app.zoo``) on procedural shapes, seeded and resumable (CPU).

The loss is the diffusers training objective for the entry's prediction type,

    L = E_{x0, t, eps} || target - f_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t[, tokens(c)]) ||^2
    target = eps (epsilon) or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (v_prediction),

with fresh procedural images every step (``make_shapes(batch, size, seed=step)``: no fixed training set to
overfit). Class-conditional entries learn the class-token table jointly and drop 10% of labels to the null
class for classifier-free guidance. A checkpoint goes to ``--out`` every ``--ckpt-every`` steps and
``--resume`` continues from it; at the end the EMA weights are exported to the entry's folder and a sample grid
is written to ``docs/figures/zoo_<name>_fp_samples.png``.

    python examples/train_zoo.py shapes32 --resume          # ~40 min on one CPU thread
    python examples/train_zoo.py shapes16-cond --resume     # ~40 min
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from qdiff_ao.app.zoo.conditioning import ClassTokens
from qdiff_ao.app.zoo.registry import ZOO, ZooEntry, zoo_entry
from qdiff_ao.app.zoo.sampling import zoo_sample
from qdiff_ao.app.zoo.shapes import make_shapes

logger = logging.getLogger("train_zoo")
REPO = Path(__file__).resolve().parents[1]
_CFG_DROP = 0.1
_DATA_SEED_OFFSET = 1_000_003  # training images never reuse the seeds of the FD reference sets


def build(entry: ZooEntry) -> tuple[torch.nn.Module, ClassTokens | None]:
    unet = getattr(diffusers, entry.unet_class)(**entry.unet_config)
    tokens = None
    if entry.conditional:
        tokens = ClassTokens(entry.num_classes, entry.num_tokens, entry.unet_config["cross_attention_dim"])
    return unet, tokens


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=sorted(ZOO))
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the entry's)")
    ap.add_argument("--out", type=Path, default=None, help="run folder (default runs/zoo-<model>)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-export", action="store_true", help="skip the export (timing and test runs)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    entry = zoo_entry(args.model)
    steps = args.steps or entry.train_steps
    out = args.out or REPO / "runs" / f"zoo-{entry.name}"
    out.mkdir(parents=True, exist_ok=True)

    unet, tokens = build(entry)
    params = list(unet.parameters()) + (list(tokens.parameters()) if tokens is not None else [])
    noise_sched = DDPMScheduler(**entry.scheduler_config)
    ema = EMAModel(params, decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    opt = torch.optim.AdamW(params, lr=entry.lr, weight_decay=1e-4)
    lr_sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=min(300, steps // 10), num_training_steps=steps)
    gen = torch.Generator().manual_seed(args.seed)
    step, elapsed, running = 0, 0.0, None
    ckpt = out / "checkpoint.pt"
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        unet.load_state_dict(state["unet"])
        if tokens is not None:
            tokens.load_state_dict(state["tokens"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        lr_sched.load_state_dict(state["lr_sched"])
        gen.set_state(state["gen"])
        step, elapsed, running = int(state["step"]), float(state["elapsed"]), state.get("running")
        logger.info("resumed from %s at step %d (%.0f s trained)", ckpt, step, elapsed)
    logger.info("%s: %s with %d parameters", entry.name, entry.unet_class, sum(p.numel() for p in params))

    def checkpoint() -> None:
        state = dict(unet=unet.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), gen=gen.get_state(),
                     lr_sched=lr_sched.state_dict(), step=step, elapsed=elapsed, running=running)
        if tokens is not None:
            state["tokens"] = tokens.state_dict()
        torch.save(state, out / "checkpoint.tmp")
        (out / "checkpoint.tmp").replace(ckpt)  # atomic: a kill never leaves a half-written checkpoint

    unet.train()
    bar = tqdm(total=steps, initial=step, desc=entry.name, mininterval=30, smoothing=0.05)
    t0 = time.perf_counter()
    while step < steps:
        x0, labels = make_shapes(entry.batch_size, entry.image_size, seed=_DATA_SEED_OFFSET + args.seed * steps + step)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (entry.batch_size,), generator=gen)
        x_t = noise_sched.add_noise(x0, noise, t)
        target = noise_sched.get_velocity(x0, noise, t) if entry.scheduler_config["prediction_type"] == "v_prediction" \
            else noise
        kwargs = {}
        if tokens is not None:
            drop = torch.rand(entry.batch_size, generator=gen) < _CFG_DROP
            kwargs["encoder_hidden_states"] = tokens(torch.where(drop, tokens.null_class, labels))
        loss = F.mse_loss(unet(x_t, t, **kwargs).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        ema.step(params)
        step += 1
        running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}", refresh=False)
        if step % 100 == 0:
            logger.info("step %d loss(ema.99) %.4f lr %.2e", step, running, lr_sched.get_last_lr()[0])
        if step % args.ckpt_every == 0 or step == steps:
            elapsed += time.perf_counter() - t0
            t0 = time.perf_counter()
            checkpoint()
    bar.close()
    elapsed += time.perf_counter() - t0
    logger.info("trained %d steps in %.0f s; final running loss %.4f", step, elapsed, running or float("nan"))
    if args.no_export:
        return
    ema.copy_to(params)
    unet.eval()
    entry.folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(entry.folder / "unet", safe_serialization=True)
    noise_sched.save_pretrained(entry.folder / "scheduler")
    if tokens is not None:
        tokens.eval().save(entry.folder)
    samples = zoo_sample(entry.name, 64, seed=0, progress=False)
    from torchvision.utils import save_image

    save_image((samples + 1) / 2, str(REPO / "docs" / "figures" / f"zoo_{entry.name}_fp_samples.png"), nrow=8,
               padding=1)
    logger.info("exported EMA model to %s", entry.folder)


if __name__ == "__main__":
    main()
