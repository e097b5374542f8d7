"""Tests of the measured precision fallback (``passes.choose_float_layers`` and its use in ``quantize``)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import qdiff_ao
from qdiff_ao.passes.fallback_rounds import round_budget, spent_after_round
from qdiff_ao.passes.precision_fallback import choose_float_layers
from qdiff_ao.quantizers.simulation import Simulation
from tests.quality_fixtures import SHAPE, benign_calib, build_unet, calibrated_prepared, late_step_calib


def test_fallback_keeps_the_layer_reading_the_harmful_quantizer_in_float() -> None:
    calib = late_step_calib()
    _, prepared = calibrated_prepared(calib)
    decision = choose_float_layers(prepared, calib, rows_per_timestep=4)
    assert "conv_in" in decision.layers
    harmful = {h["value"]: h for h in decision.harmful}
    assert set(harmful) == {"sample", "conv_in"}
    assert harmful["sample"]["at_timestep"] == 10.0 and harmful["sample"]["kept"]
    assert set(decision.layers) == {layer for h in decision.harmful for layer in h["layers"]}
    assert 0 < decision.macs_fraction < 0.05
    n_candidates = sum(1 for m in prepared.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert decision.forwards < n_candidates  # group testing, not one forward per quantizer


def test_fallback_finds_nothing_on_benign_data_and_respects_the_budget() -> None:
    calib = benign_calib()
    _, prepared = calibrated_prepared(calib)
    assert "sample" not in {h["value"] for h in choose_float_layers(prepared, calib).harmful}
    late = late_step_calib()
    _, prepared = calibrated_prepared(late)
    none_allowed = choose_float_layers(prepared, late, max_macs_fraction=0.0)
    assert none_allowed.layers == () and not any(h["kept"] for h in none_allowed.harmful)
    with pytest.raises(ValueError, match="share"):
        choose_float_layers(prepared, late, share=0)


def test_an_activation_is_weighed_against_the_activations_error_not_the_weights_rounding() -> None:
    """W4 weights with a planted outlier (conv_out's grid ruined): before reconstruction ``e_all`` is mostly weight
    rounding error, which would hide the input quantizer's late-step loss (shapes16-cond W4A8: share 0.19 of
    ``e_all`` at t = 0). Measured against the activations' own error it is harmful, and conv_in stays float."""
    g = torch.Generator().manual_seed(3)
    early = torch.randn(8, *SHAPE, generator=g) * 4.0
    late = torch.randn(8, *SHAPE, generator=g) * 0.2  # visible to the grid, but coarsely
    calib = qdiff_ao.CalibrationSet(torch.cat([early, late]), torch.cat([torch.full((8,), 900), torch.full((8,), 10)]))
    unet = build_unet()
    with torch.no_grad():
        unet.conv_out.weight[0, 0, 0, 0] = 20 * unet.conv_out.weight.abs().max()
    prepared = qdiff_ao.prepare(unet, qdiff_ao.QuantConfig(weight_bits=4), calib.example_inputs(1))
    qdiff_ao.calibrate(prepared, calib, progress=False)
    decision = choose_float_layers(prepared, calib, rows_per_timestep=4)
    late_step = decision.timesteps.index(10.0)
    assert decision.activations_on[late_step] < decision.all_on[late_step]
    harmful = {(h["value"], h["kind"]): h for h in decision.harmful}
    assert ("conv_out", "weight") in harmful and "conv_in" in decision.layers
    found = harmful[("sample", "activation")]
    assert found["at_timestep"] == 10.0 and found["kept"]
    error = found["worst_error"]
    assert found["share"] == pytest.approx((error / decision.activations_on[late_step]) ** 2)
    assert found["share"] > 0.25 > (error / decision.all_on[late_step]) ** 2  # the e_all rule would have missed it
    weight = harmful[("conv_out", "weight")]
    assert weight["share"] == pytest.approx(
        (weight["worst_error"] / decision.all_on[decision.timesteps.index(weight["at_timestep"])]) ** 2)


def test_weights_only_config_gets_the_fallback_too() -> None:
    """W4A32: no activation quantizer, but one layer's 4-bit weights can still carry the error alone (a planted
    outlier ruins conv_out's grid for its first output channel); the fallback must find it there as well."""
    from diffusers import DDIMScheduler

    calib = benign_calib(rows=4)
    unet = build_unet()
    with torch.no_grad():
        unet.conv_out.weight[0, 0, 0, 0] = 50 * unet.conv_out.weight.abs().max()
    cfg = qdiff_ao.QuantConfig(weight_bits=4, act_bits=None)
    prepared = qdiff_ao.prepare(unet, cfg, calib.example_inputs(1))
    qdiff_ao.calibrate(prepared, calib, progress=False)
    decision = choose_float_layers(prepared, calib)
    assert "conv_out" in decision.layers
    assert decision.harmful and all(h["kind"] == "weight" for h in decision.harmful)
    qunet = qdiff_ao.quantize(unet, DDIMScheduler(), cfg, calib=calib, reconstruct=False, batch_size=8,
                              progress=False, fallback_rounds=1)
    assert "conv_out" in qunet.quantization_info["precision_fallback"]["layers"]
    assert type(qunet.graph_module.get_submodule("conv_out")) is nn.Conv2d


def test_quantize_default_recipe_uses_the_fallback_and_records_it() -> None:
    from diffusers import DDIMScheduler

    calib = late_step_calib(rows=4)
    qunet = qdiff_ao.quantize(build_unet(), DDIMScheduler(), qdiff_ao.QuantConfig(weight_bits=8), calib=calib,
                              reconstruct=False, batch_size=8, progress=False)
    info = qunet.quantization_info
    fallback = info["precision_fallback"]
    assert "conv_in" in fallback["layers"]
    assert "conv_in" in info["config"]["keep_float"]
    assert type(qunet.graph_module.get_submodule("conv_in")) is nn.Conv2d
    # rounds: measured again after each round that kept new layers, the last round finding nothing new (or the
    # round limit); the 5% budget is shared by all rounds
    assert 2 <= fallback["rounds"] <= 3 and 0 < fallback["macs_fraction"] <= 0.05
    assert sorted(fallback["layers"]) == sorted(info["config"]["keep_float"])
    assert {h["round"] for h in fallback["harmful"]} <= set(range(1, fallback["rounds"] + 1))
    single = qdiff_ao.quantize(build_unet(), DDIMScheduler(), qdiff_ao.QuantConfig(weight_bits=8), calib=calib,
                               reconstruct=False, batch_size=8, progress=False, fallback_rounds=1)
    assert single.quantization_info["precision_fallback"]["rounds"] == 1
    assert set(single.quantization_info["precision_fallback"]["layers"]) <= set(fallback["layers"])


def test_groups_hold_one_kind_so_4_bit_weights_do_not_split_every_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before reconstruction one 4-bit weight quantizer alone can pass the activations' threshold without being
    harmful as a weight. A group of both kinds (tested against the lower threshold) was then halved down to single
    quantizers: 178 forwards that found nothing on the CIFAR-size UNet. Every measured group holds one kind, and on
    benign data the search needs few forwards beyond the first partition."""
    import qdiff_ao.passes.precision_fallback as fallback

    switched_on: list[tuple[bool, frozenset[str]]] = []  # per forward: any weight quantizer on, activations on
    build = fallback.build_simulation

    def spying(prepared: torch.fx.GraphModule) -> Simulation:
        sim = build(prepared)
        run = sim.run

        def recorded(inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
            switched_on.append((any(layer.enabled for layer in sim.layers.values()),
                                frozenset(n for n, a in sim.acts.items() if a.enabled and a.quant is not None)))
            return run(inputs)

        monkeypatch.setattr(sim, "run", recorded)
        return sim

    calib = benign_calib()
    _, prepared = calibrated_prepared(calib, qdiff_ao.QuantConfig(weight_bits=4))
    monkeypatch.setattr(fallback, "build_simulation", spying)
    decision = choose_float_layers(prepared, calib, groups=8)
    rows = len(switched_on) // decision.forwards  # forwards the probe splits its rows into, per measurement
    searched = switched_on[4 * rows:]  # after: float reference, all on, activations on, MAC count
    # quantizers that no float layer can remove (the attention probabilities') are not candidates and stay on
    background = frozenset.intersection(*(acts for _, acts in searched))
    assert any(weights for weights, _ in searched) and any(acts - background for _, acts in searched)
    assert not any(weights and acts - background for weights, acts in searched)
    assert decision.harmful == () and decision.forwards < 40  # 28 here; with groups of both kinds 138


@given(budget=st.floats(0.0, 0.5), shares=st.lists(st.floats(0.0, 1.0), max_size=6))
def test_rounds_never_spend_more_than_the_budget(budget: float, shares: list[float]) -> None:
    """Rounds that each spend any part of their own budget (a share of the layers still quantized) never move
    more than ``budget`` of the original MACs to float in total, and a round that spends all of its budget ends
    exactly there (up to rounding)."""
    used = 0.0
    for share in shares:
        allowed = round_budget(budget, used)
        assert allowed >= 0.0
        used = spent_after_round(used, share * allowed)
        assert used <= budget + 1e-12
    if shares and shares[-1] == 1.0:
        assert used == pytest.approx(budget, abs=1e-12)
