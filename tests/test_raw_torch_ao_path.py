"""The raw torch.ao path of the README gives a graph that qdiff_ao's passes and checkpoints accept as they are.

    trace -> split_shortcut -> torch's prepare_fx (our mapping, backend config, prepare_custom_config())
          -> observe_softmax -> calibrate -> choose_attention_grids -> reconstruct (no model=)
          -> torch's convert_fx (convert_custom_config())
          -> QuantizedUNet.save_pretrained -> from_pretrained
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import qdiff_ao
from tests.unet_factory import build_unet, calibrated_unet, unet_inputs


def _calib(family: str) -> qdiff_ao.CalibrationSet:
    rows = [unet_inputs(family, 4, t=t, seed=20 + i) for i, t in enumerate((900, 300))]
    return qdiff_ao.CalibrationSet(torch.cat([r["sample"] for r in rows]), torch.cat([r["timestep"] for r in rows]))


def test_raw_path_graph_is_accepted_like_ours(tmp_path: Path) -> None:
    family = "attn"
    unet = build_unet(family)
    cfg = qdiff_ao.QuantConfig(weight_bits=4, act_bits=8,
                               reconstruction=qdiff_ao.ReconstructionConfig(weight_iters=4, act_iters=2))
    calib = _calib(family)
    example = calib.example_inputs(2)

    gm = qdiff_ao.passes.split_shortcut(qdiff_ao.trace(unet, example))
    prepared = prepare_fx(gm, qdiff_ao.get_qconfig_mapping(cfg), tuple(example.values()),
                          prepare_custom_config=qdiff_ao.prepare_custom_config(),
                          backend_config=qdiff_ao.get_backend_config(cfg))
    qdiff_ao.passes.observe_softmax(prepared, cfg)
    ours = qdiff_ao.prepare(unet, cfg, example)
    raw_info, our_info = qdiff_ao.graph_info(prepared), qdiff_ao.graph_info(ours)
    assert raw_info.trace == our_info.trace and raw_info.splits == our_info.splits and raw_info.splits
    assert raw_info.config == cfg and raw_info.softmax_observers == our_info.softmax_observers != ()
    assert dict(raw_info.module_types) == dict(our_info.module_types)

    qdiff_ao.calibrate(prepared, calib, progress=False)
    grids = qdiff_ao.passes.choose_attention_grids(prepared)  # the default "measured" grids, config from the info
    assert len(grids) == 3 * len(raw_info.softmax_observers) > 0
    assert qdiff_ao.passes.reconstruct(prepared, calib, progress=False) is prepared  # module types from the info
    assert set(qdiff_ao.graph_info(prepared).reconstruction["blocks"]) >= {"down_blocks.0.resnets.0"}
    qdiff_ao.passes.freeze_wide_softmax_observers(prepared)
    converted = convert_fx(copy.deepcopy(prepared), convert_custom_config=qdiff_ao.convert_custom_config(),
                           backend_config=qdiff_ao.get_backend_config(cfg))
    assert qdiff_ao.graph_info(converted).splits == raw_info.splits

    qunet = qdiff_ao.QuantizedUNet(converted, like=unet)
    loaded = qdiff_ao.QuantizedUNet.from_pretrained(qunet.save_pretrained(tmp_path / "raw"))
    x = unet_inputs(family, 3, t=500, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(**x).sample, qunet(**x).sample)
        # qdiff_ao.convert on the same prepared graph lowers to the same model
        assert torch.equal(qdiff_ao.convert(prepared)(**x), converted(**x))


def test_without_custom_configs_the_error_says_how_to_fix_it() -> None:
    unet = build_unet("attn")
    cfg = qdiff_ao.QuantConfig(weight_bits=4, act_bits=8)
    example = unet_inputs("attn", 2)
    gm = qdiff_ao.trace(unet, example)
    prepared = prepare_fx(gm, qdiff_ao.get_qconfig_mapping(cfg), tuple(example.values()),
                          backend_config=qdiff_ao.get_backend_config(cfg))
    try:
        qdiff_ao.graph_info(prepared)
    except ValueError as err:
        assert "prepare_custom_config=qdiff_ao.prepare_custom_config()" in str(err)
    else:
        raise AssertionError("graph_info of a graph prepared without our custom config must raise")


def test_convert_leaves_the_prepared_graph_working_unless_asked_inplace() -> None:
    """convert_fx rewrites its input; qdiff_ao.convert lowers a copy (torch.ao eager convert's inplace=False)."""
    _, prepared = calibrated_unet("attn", qdiff_ao.QuantConfig(weight_bits=4, act_bits=8))
    x = unet_inputs("attn", 3, t=400, seed=5)
    code, state = prepared.code, {k: v.clone() for k, v in prepared.state_dict().items()}
    with torch.no_grad():
        first = qdiff_ao.convert(prepared)
        assert prepared.code == code and prepared.state_dict().keys() == state.keys()
        assert all(torch.equal(v, state[k]) for k, v in prepared.state_dict().items())
        assert torch.equal(qdiff_ao.convert(prepared)(**x), first(**x))  # it converts again to the same model
        spent = qdiff_ao.convert(prepared, inplace=True)
        assert torch.equal(spent(**x), first(**x))
