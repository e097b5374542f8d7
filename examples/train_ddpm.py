"""Train the bundled digits DDPM: a small diffusers UNet2DModel on 16x16 handwritten digits (CPU).

The UNet holds every structure Q-Diffusion targets: skip concats feeding the up-block resnets, an attention
level (AttnDownBlock2D / AttnUpBlock2D at 8x8), three resolutions, GroupNorm + SiLU resnets. It predicts
epsilon under ``L = E_{x0, t, eps} ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)||^2`` with
1000 training steps and the cosine ("squaredcos_cap_v2") beta schedule: at 16x16 the linear schedule
destroys the image after a few hundred steps, leaving most timesteps nearly pure noise, while the cosine
schedule spreads the signal-to-noise ratio evenly (Nichol & Dhariwal 2021).

Training is seeded and resumable: a checkpoint goes to ``--out`` every ``--ckpt-every`` steps and a rerun
with ``--resume`` continues from it. At the end the EMA weights are exported to
``qdiff_ao/app/bundled/digits-ddpm/{unet,scheduler}`` and a 64-sample DDIM-50 grid is written to the run folder
and to ``docs/figures/digits_fp_samples.png``.

    python examples/train_ddpm.py --steps 12000 --resume   # ~1 h on one CPU thread
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from torchvision.utils import save_image
from tqdm import tqdm

from qdiff_ao.app.bundled import DIGITS_DDPM_DIR, load_digits_tensor

logger = logging.getLogger("train_ddpm")
REPO = Path(__file__).resolve().parents[1]
UNET_CONFIG = dict(
    sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
    block_out_channels=(32, 64, 64), norm_num_groups=8, attention_head_dim=8,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                        clip_sample=True, clip_sample_range=1.0)


@torch.no_grad()
def ddim_sample(unet: UNet2DModel, scheduler_config: dict, n: int, steps: int = 50, seed: int = 0) -> torch.Tensor:
    """Draw ``n`` images in [-1, 1] with deterministic DDIM (eta = 0)."""
    ddim = DDIMScheduler.from_config(scheduler_config)
    ddim.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    x = torch.randn(n, unet.config.in_channels, size, size, generator=gen)
    unet.eval()
    for t in ddim.timesteps:
        x = ddim.step(unet(x, t).sample, t, x).prev_sample
    return x.clamp(-1, 1)


def save_grid(x: torch.Tensor, *paths: Path) -> None:
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        save_image((x + 1) / 2, str(p), nrow=8, padding=1, pad_value=1.0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12000, help="total optimizer steps")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (cosine decay)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "ddpm", help="run folder (checkpoints, grids)")
    ap.add_argument("--export", type=Path, default=DIGITS_DDPM_DIR, help="where the final EMA model goes")
    ap.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt if present")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--ckpt-every", type=int, default=500)
    ap.add_argument("--sample-every", type=int, default=2000, help="write an EMA sample grid every N steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-export", action="store_true", help="skip the export (timing runs)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    data = load_digits_tensor("train")
    unet = UNet2DModel(**UNET_CONFIG)
    noise_sched = DDPMScheduler(**SCHEDULER_CONFIG)
    ema = EMAModel(unet.parameters(), decay=0.9995, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-4)
    lr_sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=min(500, args.steps // 10),
                                               num_training_steps=args.steps)
    gen = torch.Generator().manual_seed(args.seed)
    step, elapsed, running = 0, 0.0, None
    ckpt = args.out / "checkpoint.pt"
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        lr_sched.load_state_dict(state["lr_sched"])
        gen.set_state(state["gen"])
        step, elapsed, running = int(state["step"]), float(state["elapsed"]), state.get("running")
        logger.info("resumed from %s at step %d (%.0f s trained)", ckpt, step, elapsed)
    n_params = sum(p.numel() for p in unet.parameters())
    logger.info("UNet2DModel with %d parameters, %d training images", n_params, len(data))

    def checkpoint() -> None:
        state = dict(unet=unet.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), gen=gen.get_state(),
                     lr_sched=lr_sched.state_dict(), step=step, elapsed=elapsed, running=running)
        torch.save(state, args.out / "checkpoint.tmp")
        (args.out / "checkpoint.tmp").replace(ckpt)  # atomic: a kill never leaves a half-written checkpoint

    def ema_unet() -> UNet2DModel:
        model = UNet2DModel(**UNET_CONFIG)
        ema.copy_to(model.parameters())
        return model.eval()

    unet.train()
    bar = tqdm(total=args.steps, initial=step, desc="ddpm", mininterval=15, smoothing=0.05)
    t0 = time.perf_counter()
    while step < args.steps:
        idx = torch.randint(0, len(data), (args.batch_size,), generator=gen)
        x0 = data[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (args.batch_size,), generator=gen)
        loss = F.mse_loss(unet(noise_sched.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(unet.parameters())
        step += 1
        running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}", refresh=False)
        if step % 100 == 0:
            logger.info("step %d loss(ema.99) %.4f lr %.2e", step, running, lr_sched.get_last_lr()[0])
        if step % args.ckpt_every == 0 or step == args.steps:
            elapsed += time.perf_counter() - t0
            t0 = time.perf_counter()
            checkpoint()
        if step % args.sample_every == 0:
            grid = ddim_sample(ema_unet(), noise_sched.config, 64, seed=args.seed)
            save_grid(grid, args.out / f"grid_{step:06d}.png")
            unet.train()
    bar.close()
    elapsed += time.perf_counter() - t0
    logger.info("trained %d steps in %.0f s total; final running loss %.4f", step, elapsed, running or float("nan"))
    if args.no_export:
        return
    final = ema_unet()
    final.save_pretrained(args.export / "unet", safe_serialization=True)
    noise_sched.save_pretrained(args.export / "scheduler")
    grid = ddim_sample(final, noise_sched.config, 64, seed=args.seed)
    save_grid(grid, args.out / "grid_final.png", REPO / "docs" / "figures" / "digits_fp_samples.png")
    logger.info("exported EMA UNet + scheduler to %s", args.export)


if __name__ == "__main__":
    main()
