"""Tests of passes.reconstruct: AdaRound + activation step sizes per BRECQ block, baked so convert reproduces them."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D

import qdiff_ao
from qdiff_ao.capture.graph_state import update_graph_info
from qdiff_ao.observers.frozen import FrozenObserver

# The module itself (qdiff_ao.passes.reconstruct is the function of the same name).
from qdiff_ao.passes.reconstruction import runner as recon_module  # noqa: E402
from qdiff_ao.passes.reconstruction.runner import cache_bytes_per_row, module_types_of, reconstruct
from qdiff_ao.quantizers.adaround import AdaRoundWeight, LearnedStepQuant, beta_schedule, rectified_sigmoid


def tiny_unet(seed: int = 0) -> UNet2DModel:
    """conv_in -> [resnet, down] -> [resnet, attention] -> mid -> up blocks with split shortcuts -> conv_out."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), norm_num_groups=4,
        layers_per_block=1, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def tiny_cond_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=16, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def calib_for(unet: torch.nn.Module, rows: int = 16, cond: bool = False) -> qdiff_ao.CalibrationSet:
    g = torch.Generator().manual_seed(1)
    c = unet.config.in_channels
    timesteps = torch.tensor([900] * (rows // 2) + [100] * (rows - rows // 2))
    ehs = torch.randn(rows, 4, 16, generator=g) if cond else None
    return qdiff_ao.CalibrationSet(torch.randn(rows, c, 8, 8, generator=g), timesteps, encoder_hidden_states=ehs)


def prepared_for(unet: torch.nn.Module, calib: qdiff_ao.CalibrationSet, **cfg: Any) -> torch.fx.GraphModule:
    cfg.setdefault("range_method", "minmax")  # fast observers; the Lp search is not under test here
    prepared = qdiff_ao.prepare(unet, qdiff_ao.QuantConfig(**cfg), calib.example_inputs(2))
    qdiff_ao.calibrate(prepared, calib, progress=False)
    return prepared


def run(prepared: torch.fx.GraphModule, calib: qdiff_ao.CalibrationSet, unet: torch.nn.Module,
        monkeypatch: pytest.MonkeyPatch, **rcfg: Any) -> tuple[dict[str, Any], Any]:
    """reconstruct(), also returning the internal simulation (to read AdaRound's codes)."""
    seen: dict[str, Any] = {}
    build = recon_module.build_simulation

    def spy(p: torch.fx.GraphModule) -> Any:
        seen["sim"] = build(p)
        return seen["sim"]

    monkeypatch.setattr(recon_module, "build_simulation", spy)
    rcfg.setdefault("batch_size", 4)
    state_path = rcfg.pop("state_path", None)
    reconstruct(prepared, calib, qdiff_ao.ReconstructionConfig(**rcfg), model=unet, progress=False,
                state_path=state_path)
    return qdiff_ao.graph_info(prepared).reconstruction, seen["sim"]


# ---------------------------------------------------------------- quantizer math


def test_adaround_init_reproduces_weight_and_hard_rounding_is_nearest() -> None:
    """h(V) starts at the fractional part, so W_soft == W inside the range and W_hard == nearest (no ties)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, 3, 3, generator=g)
    scale = w.abs().amax(dim=(1, 2, 3)) / 7
    q = AdaRoundWeight(scale, torch.zeros(6, dtype=torch.int64), -8, 7, ch_axis=0)
    q.init_rounding(w)
    slack = 8 * torch.finfo(torch.float32).eps * w.abs().max()
    assert (q.soft_weight() - w).abs().max() <= slack
    assert torch.equal(q.hard_codes(), q.nearest_codes(w))
    q.set_mode("hard")
    assert torch.equal(q(w), q.dequantize_codes(q.hard_codes()))
    # the regulariser vanishes exactly when every h is 0 or 1
    q.v.data = torch.where(q.v > 0, 10.0, -10.0)
    assert float(q.regularizer(2.0).detach()) == 0.0
    assert torch.equal(rectified_sigmoid(torch.tensor([-10.0, 10.0])), torch.tensor([0.0, 1.0]))


def test_beta_schedule_has_warmup_then_anneals_start_to_end() -> None:
    betas = [beta_schedule(i, 100, 0.2, 20.0, 2.0) for i in range(100)]
    assert all(b is None for b in betas[:20])
    assert betas[20] == 20.0 and betas[-1] == pytest.approx(2.0)
    rest = [b for b in betas[20:] if b is not None]
    assert all(a > b for a, b in zip(rest, rest[1:]))


def test_learned_step_quant_matches_fake_quant_and_has_lsq_gradient() -> None:
    """Forward is exact fake-quant; d x_hat / d s = round(x/s) - x/s inside the range, q_max - z when clipped."""
    fq = LearnedStepQuant(torch.tensor(0.1), torch.tensor(3), 0, 15)
    x = torch.tensor([0.04, 0.26, 5.0])
    y = fq(x)
    assert torch.allclose(y, torch.tensor([0.0, 0.3, 1.2]))
    s = fq.scale
    grads = [torch.autograd.grad(fq(x[i : i + 1]).sum(), fq.log_ratio)[0] / s for i in range(3)]
    expected = [0.0 - 0.4, 3.0 - 2.6, 15 - 3]
    assert [float(g_.detach()) for g_ in grads] == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------- blocks


def test_blocks_follow_the_module_hierarchy(monkeypatch: pytest.MonkeyPatch) -> None:
    unet = tiny_unet()
    calib = calib_for(unet, rows=4)
    prepared = prepared_for(unet, calib)
    report, sim = run(prepared, calib, unet, monkeypatch, weight_iters=0, act_iters=0)
    blocks = report["blocks"]
    resnets = {n for n, m in unet.named_modules() if isinstance(m, ResnetBlock2D)}
    attentions = {n for n, m in unet.named_modules() if isinstance(m, Attention)}
    assert {n for n, b in blocks.items() if b["kind"] == "resnet"} == resnets
    assert {n for n, b in blocks.items() if b["kind"] == "attention"} == attentions
    singles = {n for n, b in blocks.items() if b["kind"] == "layer"}
    assert {"conv_in", "conv_out", "time_embedding.linear_1", "down_blocks.0.downsamplers.0.conv"} <= singles
    # every quantized layer (split-shortcut halves included) is in exactly one block
    layers = [layer for b in blocks.values() for layer in b["layers"]]
    assert sorted(layers) == sorted(sim.layers) and len(layers) == len(set(layers))
    assert any(layer.endswith("conv_shortcut.part1") for layer in layers)
    # graph order: a resnet of the first down block comes before the attention that follows it
    names = list(blocks)
    assert names.index("down_blocks.1.resnets.0") < names.index("down_blocks.1.attentions.0") < names.index("conv_out")


def test_missing_module_hierarchy_and_bad_arguments_raise() -> None:
    unet = tiny_unet()
    calib = calib_for(unet, rows=4)
    prepared = prepared_for(unet, calib)
    assert set(qdiff_ao.graph_info(prepared).module_types) == set(module_types_of(unet))  # recorded by trace()
    update_graph_info(prepared, module_types={})
    with pytest.raises(ValueError, match="model=<the diffusers UNet"):
        reconstruct(prepared, calib, qdiff_ao.ReconstructionConfig(weight_iters=1), progress=False)
    with pytest.raises(TypeError, match="CalibrationSet"):
        reconstruct(prepared, {"sample": calib.sample}, model=unet)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_cache_bytes"):
        reconstruct(prepared, calib, qdiff_ao.ReconstructionConfig(max_cache_bytes=64), model=unet, progress=False)


# ---------------------------------------------------------------- quality and exactness


def test_adaround_beats_nearest_rounding_at_w3(monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights only, 3 bits: every resnet/attention block ends with a strictly lower output error."""
    unet = tiny_unet()
    calib = calib_for(unet)
    prepared = prepared_for(unet, calib, weight_bits=3, act_bits=None)
    report, _ = run(prepared, calib, unet, monkeypatch, weight_iters=100, weight_lr=1e-2, act_iters=0)
    big = {n: b for n, b in report["blocks"].items() if b["kind"] != "layer"}
    assert big
    for name, b in big.items():
        assert b["lp_after"] < b["lp_before"], name
        assert b["mse_after"] < b["mse_before"], name
    total_before = sum(b["mse_before"] for b in report["blocks"].values())
    total_after = sum(b["mse_after"] for b in report["blocks"].values())
    assert total_after < 0.95 * total_before


def _reconstruct_with_spoiled_runs(monkeypatch: pytest.MonkeyPatch, runs_to_spoil: int,
                                   weight_iters: int) -> dict[str, Any]:
    """Weights-only W3 reconstruction of the tiny UNet in which the first ``runs_to_spoil`` AdaRound runs of every
    block end with every weight rounded the other way (V -> -V flips [h(V) >= 1/2]): runs that clearly lose to
    nearest rounding. Returns the report."""
    unet = tiny_unet()
    calib = calib_for(unet)
    prepared = prepared_for(unet, calib, weight_bits=3, act_bits=None)
    real = recon_module.BlockTrainer.learn_rounding
    runs: dict[tuple[int, ...], int] = {}

    def learn(self: Any, layers: list[Any], acts: list[Any], bar: Any) -> float:
        seconds = real(self, layers, acts, bar)
        key = tuple(id(layer) for layer in layers)
        runs[key] = runs.get(key, 0) + 1
        if runs[key] <= runs_to_spoil:
            for layer in layers:
                layer.quant.v = torch.nn.Parameter(-layer.quant.v.detach())
        return seconds

    monkeypatch.setattr(recon_module.BlockTrainer, "learn_rounding", learn)
    return run(prepared, calib, unet, monkeypatch, weight_iters=weight_iters, weight_lr=1e-2, act_iters=0)[0]


def test_a_lost_rounding_falls_back_to_nearest_without_a_second_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A spoiled AdaRound run: the block keeps round-to-nearest, its error is the one before reconstruction, and
    no block is learned a second time (a retry judged on the training rows made samples worse: DESIGN.md)."""
    calls: list[int] = []
    real = recon_module.BlockTrainer.learn_rounding

    def counted(self: Any, *args: Any) -> float:
        calls.append(id(self))
        return real(self, *args)

    monkeypatch.setattr(recon_module.BlockTrainer, "learn_rounding", counted)
    report = _reconstruct_with_spoiled_runs(monkeypatch, runs_to_spoil=1, weight_iters=20)
    learned = [name for name, b in report["blocks"].items() if b["weight_iters"]]  # blocks with a loss output
    assert learned and len(calls) == len(learned)
    for name in learned:
        b = report["blocks"][name]
        assert b["rounding"] == "nearest", name
        assert "lp_retried_rounding" not in b, name
        assert b["lp_after"] == pytest.approx(b["lp_before"], rel=1e-5), name


def test_baked_weights_survive_convert_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """convert's integer weights are AdaRound's hard codes, and the converted model computes the simulation."""
    unet = tiny_unet()
    calib = calib_for(unet)
    prepared = prepared_for(unet, calib, weight_bits=4, act_bits=8)
    original = {n: m.weight.detach().clone() for n, m in prepared.named_modules() if hasattr(m, "qconfig")
                and isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    report, sim = run(prepared, calib, unet, monkeypatch, weight_iters=60, weight_lr=1e-2, act_iters=20, act_lr=1e-2)
    quantized = qdiff_ao.convert(prepared)
    flipped = 0
    for name, layer in sim.layers.items():
        codes = layer.quant.hard_codes()
        qmod = quantized.get_submodule(name)
        assert torch.equal(qmod.weight().int_repr().long(), codes), name
        assert isinstance(layer.layer.qconfig.weight(), FrozenObserver)
        flipped += int((codes != layer.quant.nearest_codes(original[name])).sum())
    assert flipped > 0  # AdaRound chose other codes than nearest rounding somewhere
    frozen_acts = [n for n, m in prepared.named_children() if isinstance(m, FrozenObserver)]
    assert frozen_acts and all(sim.acts[n].learnable for n in frozen_acts)
    learned = sim.acts[frozen_acts[0]].quant
    assert float(prepared.get_submodule(frozen_acts[0]).scale) == float(learned.scale.detach())
    _assert_layers_compute_the_simulation(sim, quantized, calib.example_inputs(4))


def _assert_layers_compute_the_simulation(sim: Any, quantized: torch.fx.GraphModule, x: dict) -> None:
    """Layer by layer, the integer kernel sees the simulation's input step and returns its output (+-1 step)."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [quantized.get_submodule(name).register_forward_hook(
        lambda m, i, o, name=name: seen.__setitem__(name, (i[0], o))) for name in sim.layers]
    with torch.no_grad():
        quantized(**x)
    for h in hooks:
        h.remove()
    nodes = {str(n.target): n for n in sim.gm.graph.nodes if n.op == "call_module"}
    for name, layer in sim.layers.items():
        q_in, q_out = seen[name]
        in_act = sim.gm.get_submodule(str(nodes[name].args[0].target))
        (user,) = nodes[name].users
        out_act = sim.gm.get_submodule(str(user.target))
        assert q_in.q_scale() == float(in_act.quant.scale.detach()), name
        with torch.no_grad():
            y = out_act(layer(q_in.dequantize()))
        diff = (y - q_out.dequantize()).abs()
        assert float(diff.max()) <= q_out.q_scale() * (1 + 1e-4), name
        assert float((diff > 1e-6).float().mean()) < 0.01, name


def test_activation_step_sizes_lower_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """W8A4 (activation error dominates): learning the step sizes lowers the blocks' errors on their rows."""
    unet = tiny_unet()
    calib = calib_for(unet)
    prepared = prepared_for(unet, calib, weight_bits=8, act_bits=4)
    report, sim = run(prepared, calib, unet, monkeypatch, weight_iters=10, weight_lr=1e-2, act_iters=50,
                      act_lr=2e-2)
    blocks = list(report["blocks"].values())
    assert all(b["act_iters"] == 50 for b in blocks)
    learned = [b for b in blocks if b["step_sizes"] == "learned"]
    assert len(learned) >= len(blocks) // 2
    assert all(b["lp_after"] < b["lp_rounded"] for b in learned)
    assert all(b["lp_after"] == b["lp_rounded"] for b in blocks if b["step_sizes"] == "calibrated")
    assert sum(b["lp_after"] for b in blocks) < 0.9 * sum(b["lp_rounded"] for b in blocks)
    frozen = {n for n, m in prepared.named_children() if isinstance(m, FrozenObserver)}
    moved = {n for n, a in sim.acts.items() if a.learnable and float(a.quant.log_ratio.detach()) != 0.0}
    assert moved and moved == frozen  # exactly the learned step sizes were frozen into the prepared graph


def test_deterministic_with_a_seed_and_bounded_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    unet = tiny_unet()
    calib = calib_for(unet)
    prepared = prepared_for(unet, calib, weight_bits=4, act_bits=8)
    twin = copy.deepcopy(prepared)
    kwargs = dict(weight_iters=15, weight_lr=1e-2, act_iters=5, max_cache_bytes=200_000, seed=3)
    rep_a, sim_a = run(prepared, calib, unet, monkeypatch, **kwargs)
    rep_b, sim_b = run(twin, calib, unet, monkeypatch, **kwargs)
    assert rep_a["blocks"].keys() == rep_b["blocks"].keys()
    for name in rep_a["blocks"]:
        assert rep_a["blocks"][name]["lp_after"] == rep_b["blocks"][name]["lp_after"]
    for name in sim_a.layers:
        assert torch.equal(sim_a.layers[name].quant.hard_codes(), sim_b.layers[name].quant.hard_codes())
    # the cache bound picked a subset of the 16 rows: as many as cache_bytes_per_row says fit
    per_row = cache_bytes_per_row(twin, calib, model=unet)
    assert rep_a["num_samples"] == 200_000 // per_row and 1 <= rep_a["num_samples"] < len(calib)
    assert rep_a["cache_bytes"] <= 200_000


# ---------------------------------------------------------------- smoke tests on other UNets


def test_conditional_unet_with_transformer_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    unet = tiny_cond_unet()
    calib = calib_for(unet, rows=8, cond=True)
    prepared = prepared_for(unet, calib, weight_bits=4, act_bits=8)
    report, sim = run(prepared, calib, unet, monkeypatch, weight_iters=10, weight_lr=1e-2, act_iters=5)
    kinds = {b["kind"] for b in report["blocks"].values()}
    assert kinds == {"resnet", "transformer", "layer"}
    transformer = next(b for b in report["blocks"].values() if b["kind"] == "transformer")
    assert transformer["num_layers"] == 10  # attn1 q/k/v/out, attn2 q/k/v/out, ff proj and out
    quantized = qdiff_ao.convert(prepared)
    out = quantized(**calib.example_inputs(2))
    assert out.shape == (2, 4, 8, 8) and bool(torch.isfinite(out).all())
    for name, layer in sim.layers.items():
        assert torch.equal(quantized.get_submodule(name).weight().int_repr().long(), layer.quant.hard_codes())


def test_module_types_from_meta_and_w8a8(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hierarchy may come from the graph info; W8A8 uses the reduced [-64, 63] weight range."""
    unet = tiny_unet()
    calib = calib_for(unet, rows=4)
    prepared = prepared_for(unet, calib, weight_bits=8, act_bits=8)
    update_graph_info(prepared, module_types=module_types_of(unet))
    assert reconstruct(prepared, calib, qdiff_ao.ReconstructionConfig(weight_iters=5, act_iters=2, batch_size=2),
                       progress=False) is prepared
    report = qdiff_ao.graph_info(prepared).reconstruction
    assert "down_blocks.0.resnets.0" in report["blocks"]
    quantized = qdiff_ao.convert(prepared)
    codes = quantized.get_submodule("conv_in").weight().int_repr()
    assert int(codes.min()) >= -64 and int(codes.max()) <= 63


def test_interrupted_run_resumes_to_the_same_result(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    unet = tiny_unet()
    calib = calib_for(unet, rows=8)
    prepared = prepared_for(unet, calib, weight_bits=4, act_bits=8)
    fresh, interrupted = copy.deepcopy(prepared), copy.deepcopy(prepared)
    kwargs = dict(weight_iters=8, weight_lr=1e-2, act_iters=4)
    ref_report, ref_sim = run(fresh, calib, unet, monkeypatch, **kwargs)
    state = tmp_path / "recon.safetensors"
    real = recon_module._reconstruct_block
    calls = {"n": 0}

    def crash_after_three(*args: Any, **kw: Any) -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(recon_module, "_reconstruct_block", crash_after_three)
    rcfg = qdiff_ao.ReconstructionConfig(batch_size=4, **kwargs)
    with pytest.raises(KeyboardInterrupt):
        reconstruct(copy.deepcopy(prepared), calib, rcfg, model=unet, progress=False, state_path=state)
    monkeypatch.setattr(recon_module, "_reconstruct_block", real)
    report, sim = run(interrupted, calib, unet, monkeypatch, state_path=state, **kwargs)
    resumed = [n for n, b in report["blocks"].items() if b.get("resumed")]
    assert resumed == list(report["blocks"])[:3]
    for name, layer in sim.layers.items():
        assert torch.equal(layer.quant.hard_codes(), ref_sim.layers[name].quant.hard_codes()), name
    assert [b["lp_after"] for b in report["blocks"].values()] == pytest.approx(
        [b["lp_after"] for b in ref_report["blocks"].values()], rel=1e-6)
    with pytest.raises(ValueError, match="other settings"):
        reconstruct(copy.deepcopy(prepared), calib, qdiff_ao.ReconstructionConfig(weight_iters=9), model=unet,
                    progress=False, state_path=state)
