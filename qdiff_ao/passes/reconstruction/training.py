"""Optimisation of one block: AdaRound rounding variables, then activation step sizes (Q-Diffusion Sec. 4.3).

Given the block's cached inputs ``X_q`` (from the model quantized so far) and full-precision outputs ``Y``:

    weights      min_V  E|f_block(X_q; W_soft(V)) - Y|^p  +  reg_weight * sum_layers reg_beta(V)
                 Adam(lr=weight_lr); no regulariser for the first warmup * weight_iters steps, then beta
                 annealed beta_start -> beta_end; the block's own activation quantizers are off (BRECQ);
                 finally the rounding is made hard: W_hard.
    activations  min_u  E|f_block(X_q; W_hard, s = s0 * exp(u)) - Y|^p
                 Adam(lr=act_lr) with cosine decay to 0 over act_iters, on the block's learnable quantizers.

With classifier-free guidance the cached rows are interleaved pairs ``[u_1, c_1, u_2, c_2, ...]`` of one
trajectory at one step and the loss adds the error of what the sampler uses, ``g(y) = y_u + s (y_c - y_u)``:

    loss = E|f - Y|^p + E|g(f) - g(Y)|^p

(guidance amplifies the difference of the two halves' errors s-fold; the raw term keeps each half close, since
later blocks see the halves, not their combination). Draws and evaluation chunks then take whole pairs.

Each step draws ``batch_size`` distinct cached rows with a seeded generator, so runs are deterministic. On a
process group of N ranks each rank draws ``ceil(batch_size / N)`` of its own rows and gradients are averaged
(:mod:`qdiff_ao.passes.reconstruction.data_parallel`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import fx
from tqdm import tqdm

from qdiff_ao.config import ReconstructionConfig
from qdiff_ao.passes.reconstruction.data_parallel import average_gradients, ranks_batch_size, sum_over_ranks
from qdiff_ao.quantizers.adaround import LearnedStepQuant, beta_schedule, lp_loss
from qdiff_ao.quantizers.simulation import SimActQuant, SimLayer

__all__ = ["BlockErrors", "BlockTrainer", "block_loss", "evaluate_block", "guided"]

_FUSED_ADAM_DEVICES = ("cpu", "cuda")


def guided(y: torch.Tensor, scale: float) -> torch.Tensor:
    """Rows interleaved as guidance pairs ``[u_1, c_1, u_2, c_2, ...]`` -> ``u_i + s (c_i - u_i)`` per pair."""
    uncond, cond = y[0::2], y[1::2]
    return uncond + scale * (cond - uncond)


def block_loss(out: torch.Tensor, target: torch.Tensor, p: float, guidance: float | None) -> torch.Tensor:
    """``lp_loss(out, target)``, plus ``lp_loss`` of the guided combinations when ``guidance`` is a scale."""
    loss = lp_loss(out, target, p)
    if guidance is not None:
        loss = loss + lp_loss(guided(out, guidance), guided(target, guidance), p)
    return loss


@dataclass
class BlockErrors:
    """Output error of a block over the cached rows: Lp (BRECQ's loss) and MSE, summed over loss outputs."""

    lp: float
    mse: float


def evaluate_block(
    module: fx.GraphModule,
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    loss_outputs: list[int],
    p: float,
    chunk: int,
    keep_outputs: bool = False,
    guidance: float | None = None,
) -> tuple[BlockErrors, list[torch.Tensor] | None]:
    """Errors of ``module`` on all rows (of every rank); optionally also its outputs on this rank's rows.
    ``lp`` is the training loss (:func:`block_loss`); with ``guidance``, ``chunk`` must be even (whole pairs)."""
    rows = inputs[0].shape[0] if inputs else targets[0].shape[0]
    lp = sq = 0.0
    count = 0
    parts: list[tuple[torch.Tensor, ...]] = []
    with torch.no_grad():
        for start in range(0, rows, chunk):
            outs = module(*[x[start : start + chunk] for x in inputs])
            n = min(chunk, rows - start)
            for j, k in enumerate(loss_outputs):
                tgt = targets[j][start : start + chunk]
                lp += float(block_loss(outs[k], tgt, p, guidance)) * n
                sq += float((outs[k] - tgt).double().pow(2).sum())
                count += tgt.numel()
            if keep_outputs:
                parts.append(outs)
    lp, sq, n_values, n_rows = sum_over_ranks([lp, sq, float(count), float(rows)])  # all ranks' rows
    errors = BlockErrors(lp / max(n_rows, 1.0), sq / max(n_values, 1.0))
    if not keep_outputs:
        return errors, None
    return errors, [torch.cat([p_[i] for p_ in parts]) for i in range(len(parts[0]))]


class BlockTrainer:
    """Runs the two optimisation phases of one block on its cached rows.

    Args:
        module: the compiled block (sharing the simulation's quantizers).
        inputs: cached block inputs of the quantized model, N rows each.
        targets: full-precision values of the block's loss outputs, N rows each.
        loss_outputs: indices of the loss outputs among the module's outputs.
        rcfg: the reconstruction settings.
        generator: seeded generator of the mini-batch draws.
        guidance: the guidance scale when the rows are interleaved pairs (see the module docstring), else None.
    """

    def __init__(
        self,
        module: fx.GraphModule,
        inputs: list[torch.Tensor],
        targets: list[torch.Tensor],
        loss_outputs: list[int],
        rcfg: ReconstructionConfig,
        generator: torch.Generator,
        guidance: float | None = None,
    ) -> None:
        self.module, self.inputs, self.targets = module, inputs, targets
        self.loss_outputs, self.rcfg, self.generator = loss_outputs, rcfg, generator
        self.guidance = guidance
        self.rows = targets[0].shape[0]
        self.batch = min(ranks_batch_size(rcfg.batch_size), self.rows)

    def _draw(self) -> torch.Tensor:
        if self.guidance is None:
            return torch.randperm(self.rows, generator=self.generator)[: self.batch]
        pairs = torch.randperm(self.rows // 2, generator=self.generator)[: max(1, self.batch // 2)]
        return torch.stack([2 * pairs, 2 * pairs + 1], dim=1).flatten()

    def _rec_loss(self) -> torch.Tensor:
        idx = self._draw()
        outs = self.module(*[x[idx] for x in self.inputs])
        return sum(  # type: ignore[return-value]
            (block_loss(outs[k], self.targets[j][idx], self.rcfg.p, self.guidance)
             for j, k in enumerate(self.loss_outputs)),
            torch.zeros(()),
        )

    def _loop(
        self,
        iters: int,
        params: list[torch.Tensor],
        lr: float,
        extra: Callable[[int], torch.Tensor | None],
        bar: tqdm,
        label: str,
        cosine: bool,
    ) -> None:
        # the fused kernel: one pass per tensor instead of ~10 (a 2M-weight block: 8 -> 1.1 ms per step on 2 cores)
        fused = all(p.device.type in _FUSED_ADAM_DEVICES for p in params)
        opt = torch.optim.Adam(params, lr=lr, fused=fused or None)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters, eta_min=0.0) if cosine else None
        for it in range(iters):
            rec = self._rec_loss()
            reg = extra(it)
            loss = rec if reg is None else rec + reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(params)  # across the ranks of a process group: every rank takes the same step
            opt.step()
            if sched is not None:
                sched.step()
            bar.update(1)
            if it % 10 == 0 or it == iters - 1:
                post = {f"{label}_loss": f"{rec.item():.4g}"}
                if reg is not None:
                    post["reg"] = f"{reg.item():.4g}"
                bar.set_postfix(post, refresh=False)

    def learn_rounding(self, layers: list[SimLayer], acts: list[SimActQuant], bar: tqdm) -> float:
        """AdaRound phase (block's activation quantizers off); leaves every layer in hard mode. Returns seconds."""
        start = time.perf_counter()
        for layer in layers:
            layer.quant.init_rounding(layer.layer.weight)
            layer.quant.set_mode("soft")
        for act in acts:
            act.enabled = False
        rcfg = self.rcfg

        def regulariser(it: int) -> torch.Tensor | None:
            beta = beta_schedule(it, rcfg.weight_iters, rcfg.warmup, rcfg.beta_start, rcfg.beta_end)
            if beta is None:
                return None
            return rcfg.reg_weight * sum((layer.quant.regularizer(beta) for layer in layers), torch.zeros(()))

        try:
            if rcfg.weight_iters > 0:
                self._loop(rcfg.weight_iters, [layer.quant.v for layer in layers], rcfg.weight_lr, regulariser,
                           bar, "w", cosine=False)
        finally:
            for layer in layers:
                layer.quant.set_mode("hard")
            for act in acts:
                act.enabled = True
        return time.perf_counter() - start

    def learn_step_sizes(self, acts: list[SimActQuant], bar: tqdm) -> float:
        """Activation phase over the learnable quantizers in ``acts``. Returns seconds."""
        start = time.perf_counter()
        # a learnable SimActQuant's quantizer is a LearnedStepQuant
        params: list[torch.Tensor] = [cast(LearnedStepQuant, act.quant).log_ratio for act in acts if act.learnable]
        if params and self.rcfg.act_iters > 0:
            self._loop(self.rcfg.act_iters, params, self.rcfg.act_lr, lambda it: None, bar, "a", cosine=True)
        return time.perf_counter() - start
