"""Tests for qdiff_ao.calibration and qdiff_ao.calibration_set: timestep-uniform data from the FP sampler."""

from __future__ import annotations

import json
import types
from collections import Counter

import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
    UNet2DModel,
)
from safetensors.torch import save_file

from qdiff_ao.calibration import calibrate, collect_calibration_data, select_step_indices
from qdiff_ao.calibration_set import CalibrationSet
from qdiff_ao.observers.timestep_context import current_timestep

STEPS = 10


def tiny_unet(sample_size: int = 8) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


def tiny_cond_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        layers_per_block=1,
        cross_attention_dim=16,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def collect(model, scheduler=None, **kwargs) -> CalibrationSet:
    args = {
        "num_inference_steps": STEPS,
        "num_timesteps": 5,
        "samples_per_timestep": 3,
        "batch_size": 2,
        "progress": False,
    }
    return collect_calibration_data(model, scheduler, **{**args, **kwargs})


def count_calls(module: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def sched_timesteps(scheduler) -> torch.Tensor:
    copy = type(scheduler).from_config(scheduler.config)
    copy.set_timesteps(STEPS)
    return copy.timesteps


# --- step selection and coverage --------------------------------------------------------------------------------


def test_select_step_indices_matches_q_diffusion_and_ablations() -> None:
    assert select_step_indices(100, 20, "uniform") == list(range(0, 100, 5))
    assert select_step_indices(10, 10, "uniform") == list(range(10))
    assert select_step_indices(10, 3, "uniform") == [0, 3, 6]
    assert select_step_indices(10, 3, "first") == [0, 1, 2]
    assert select_step_indices(10, 3, "last") == [7, 8, 9]
    with pytest.raises(ValueError, match="strategy"):
        select_step_indices(10, 3, "random")
    with pytest.raises(ValueError, match="num_timesteps=11"):
        select_step_indices(10, 11)


@pytest.mark.parametrize("strategy", ["uniform", "first", "last"])
def test_collected_timesteps_are_exactly_the_selected_steps(strategy: str) -> None:
    scheduler = DDIMScheduler()
    calib = collect(tiny_unet(), scheduler, strategy=strategy, num_timesteps=4, samples_per_timestep=3)
    steps = select_step_indices(STEPS, 4, strategy)
    expected = {sched_timesteps(scheduler)[i].item(): 3 for i in steps}
    assert calib.timestep_histogram() == expected
    assert len(calib) == 12
    assert Counter(calib.step_index.tolist()) == {i: 3 for i in steps}
    assert json.loads(calib.metadata["step_indices"]) == steps
    assert calib.metadata["strategy"] == strategy


@pytest.mark.parametrize(
    "scheduler",
    [
        DDIMScheduler(),
        DDPMScheduler(),
        PNDMScheduler(),
        PNDMScheduler(skip_prk_steps=True),
        EulerDiscreteScheduler(),
        DPMSolverMultistepScheduler(),
    ],
    ids=["ddim", "ddpm", "pndm", "plms", "euler", "dpm++"],
)
def test_every_scheduler_covers_its_own_trajectory(scheduler) -> None:
    timesteps = sched_timesteps(scheduler).tolist()  # PNDM: more steps than num_inference_steps
    calib = collect(tiny_unet(), scheduler, num_timesteps=5, samples_per_timestep=3)
    steps = select_step_indices(len(timesteps), 5)
    expected = Counter()
    for i in steps:
        expected[timesteps[i]] += 3
    assert calib.timestep_histogram() == dict(expected)
    assert calib.timestep.dtype == sched_timesteps(scheduler).dtype
    assert torch.isfinite(calib.sample).all()
    assert calib.metadata["num_scheduler_steps"] == str(len(timesteps))


def test_pndm_steps_sharing_a_timestep_are_counted_together() -> None:
    calib = collect(tiny_unet(), PNDMScheduler(), strategy="first", num_timesteps=3, samples_per_timestep=2)
    assert calib.timestep_histogram() == {850: 4, 900: 2}  # steps 1 and 2 both run t=850 (Runge-Kutta warm-up)
    assert Counter(calib.step_index.tolist()) == {0: 2, 1: 2, 2: 2}


def test_recorded_inputs_equal_what_ddim_pipeline_feeds_the_unet() -> None:
    unet, scheduler = tiny_unet(), DDIMScheduler()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = unet.register_forward_pre_hook(lambda _m, args: seen.append((args[0].clone(), args[1])))
    DDIMPipeline(unet=unet, scheduler=scheduler)(
        batch_size=3, generator=torch.Generator().manual_seed(7), num_inference_steps=STEPS, output_type="np"
    )
    hook.remove()
    calib = collect(unet, scheduler, seed=7, batch_size=3, samples_per_timestep=3, num_timesteps=5)
    for p, i in enumerate(select_step_indices(STEPS, 5)):
        rows = slice(3 * p, 3 * p + 3)
        assert torch.equal(calib.sample[rows], seen[i][0])
        assert (calib.timestep[rows] == seen[i][1]).all()


def test_euler_input_is_scaled_initial_noise_at_first_step() -> None:
    scheduler = EulerDiscreteScheduler()
    calib = collect(tiny_unet(), scheduler, strategy="first", num_timesteps=1, samples_per_timestep=2, seed=3)
    ref = type(scheduler).from_config(scheduler.config)
    ref.set_timesteps(STEPS)
    sigma = ref.sigmas[0]
    noise = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(calib.sample, noise * ref.init_noise_sigma / (sigma**2 + 1) ** 0.5)
    assert ref.init_noise_sigma > 1  # the scaling is not a no-op


# --- determinism, user state ------------------------------------------------------------------------------------


def test_same_seed_bit_identical_different_seed_differs() -> None:
    unet, scheduler = tiny_unet(), DDPMScheduler()  # DDPM draws noise at every step
    a, b = collect(unet, scheduler, seed=1), collect(unet, scheduler, seed=1)
    c = collect(unet, scheduler, seed=2)
    for name in ("sample", "timestep", "step_index"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert torch.equal(a.timestep, c.timestep)
    assert not torch.equal(a.sample, c.sample)


def test_user_scheduler_is_not_touched() -> None:
    scheduler = PNDMScheduler()
    scheduler.set_timesteps(4)
    before = scheduler.timesteps.clone()
    collect(tiny_unet(), scheduler)
    assert torch.equal(scheduler.timesteps, before)
    assert scheduler.counter == 0 and scheduler.ets == []


def test_pipelines_use_their_unet_and_scheduler() -> None:
    unet = tiny_unet()
    for pipe_cls, sched in ((DDPMPipeline, DDPMScheduler()), (DDIMPipeline, DDIMScheduler())):
        from_pipe = collect(pipe_cls(unet=unet, scheduler=sched))
        direct = collect(unet, sched)
        assert torch.equal(from_pipe.sample, direct.sample)
        assert from_pipe.metadata["scheduler"] == type(sched).__name__


# --- conditioning -----------------------------------------------------------------------------------------------


def test_conditional_unet_with_guidance_doubles_the_batch() -> None:
    unet = tiny_cond_unet()
    cond = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    uncond = torch.zeros(1, 5, 16)
    calib = collect(
        unet,
        DDIMScheduler(),
        encoder_hidden_states=cond,
        negative_encoder_hidden_states=uncond,
        guidance_scale=5.0,
        num_timesteps=2,
        samples_per_timestep=3,
        batch_size=2,
    )
    assert len(calib) == 2 * 2 * 3
    assert set(calib.timestep_histogram().values()) == {6}
    # first chunk of the first step: trajectories 0,1 -> rows [uncond0, uncond1, cond0, cond1]
    assert torch.equal(calib.sample[0:2], calib.sample[2:4])
    assert torch.equal(calib.encoder_hidden_states[0:2], uncond.expand(2, 5, 16))
    assert torch.equal(calib.encoder_hidden_states[2:4], cond[[0, 1]])
    # second chunk: trajectory 2 alone -> rows [uncond, cond[2 mod 2]]
    assert torch.equal(calib.encoder_hidden_states[4:6], torch.cat([uncond, cond[[0]]]))
    no_cfg = collect(
        unet, DDIMScheduler(), encoder_hidden_states=cond, guidance_scale=1.0, num_timesteps=2, samples_per_timestep=3
    )
    assert len(no_cfg) == 2 * 3
    _, inputs = next(calib.batches(4))
    assert unet(**inputs).sample.shape == (4, 4, 8, 8)


def test_pipeline_prompts_are_encoded_with_encode_prompt() -> None:
    unet, seen = tiny_cond_unet(), {}

    def encode_prompt(prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt=None):
        seen.update(prompt=prompt, cfg=do_classifier_free_guidance, negative=negative_prompt)
        cond = torch.stack([torch.full((5, 16), float(len(p))) for p in prompt])
        return cond, torch.full_like(cond, -1.0)

    pipe = types.SimpleNamespace(unet=unet, scheduler=DDIMScheduler(), encode_prompt=encode_prompt)
    calib = collect(pipe, prompts=["a", "abc"], negative_prompt="blurry", num_timesteps=1, samples_per_timestep=2)
    assert seen == {"prompt": ["a", "abc"], "cfg": True, "negative": "blurry"}
    assert calib.encoder_hidden_states[:, 0, 0].tolist() == [-1.0, -1.0, 1.0, 3.0]


# --- memory -----------------------------------------------------------------------------------------------------


def test_memory_estimate_is_exact_and_refusal_happens_before_sampling() -> None:
    unet = tiny_unet()
    calib = collect(unet, DDIMScheduler())
    assert calib.nbytes == len(calib) * (3 * 8 * 8 * 4 + 8 + 8)
    assert calib.bytes_per_sample == 3 * 8 * 8 * 4 + 16
    collect(unet, DDIMScheduler(), max_memory_bytes=calib.nbytes)  # exactly enough
    calls = count_calls(unet)
    with pytest.raises(ValueError, match=f"need {calib.nbytes:,} bytes.*samples_per_timestep"):
        collect(unet, DDIMScheduler(), max_memory_bytes=calib.nbytes - 1)
    assert calls == []


# --- bad inputs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"samples_per_timestep": 0}, "samples_per_timestep"),
        ({"num_timesteps": 0}, "num_timesteps"),
        ({"num_timesteps": STEPS + 1}, "exceeds the 10 steps"),
        ({"strategy": "random"}, "strategy"),
        ({"batch_size": 0}, "batch_size"),
        ({"sample_shape": (4, 8, 8)}, "in_channels=3"),
        ({"sample_shape": (3, 9, 9)}, "multiples of 2"),
        ({"encoder_hidden_states": torch.zeros(1, 5, 16)}, "not text-conditional"),
        ({"prompts": ["a cat"]}, "not text-conditional"),
        ({"class_labels": torch.tensor([1])}, "no class embedding"),
        ({"num_inference_steps": 2000}, "num_train_timesteps"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict, match: str) -> None:
    unet = tiny_unet()
    calls = count_calls(unet)
    with pytest.raises(ValueError, match=match):
        collect(unet, DDIMScheduler(), **kwargs)
    assert calls == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "conditional: pass prompts"),
        ({"prompts": "a cat"}, "need a pipeline"),
        ({"encoder_hidden_states": torch.zeros(1, 5, 16), "guidance_scale": 7.5}, "negative_encoder_hidden_states"),
        ({"encoder_hidden_states": torch.zeros(1, 5, 8), "guidance_scale": 1.0}, "cross_attention_dim=16"),
        (
            {"encoder_hidden_states": torch.zeros(2, 5, 16), "negative_encoder_hidden_states": torch.zeros(3, 5, 16)},
            "negative_encoder_hidden_states must be",
        ),
    ],
)
def test_bad_conditioning_is_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        collect(tiny_cond_unet(), DDIMScheduler(), **kwargs)


def test_bad_model_or_scheduler_is_refused() -> None:
    unet = tiny_unet()
    with pytest.raises(ValueError, match="scheduler is required"):
        collect(unet)
    with pytest.raises(TypeError, match="swapped"):
        collect(unet, unet)
    with pytest.raises(TypeError, match="diffusers UNet"):
        collect(DDIMScheduler(), unet)
    with pytest.raises(ValueError, match="has no `unet`"):
        collect(types.SimpleNamespace(components={}, unet=None, scheduler=DDIMScheduler()))


def test_nan_from_the_sampler_names_the_step() -> None:
    unet = tiny_unet()
    with torch.no_grad():
        unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN/Inf at sampler step index 0 \\(timestep 900\\)"):
        collect(unet, DDIMScheduler())


# --- CalibrationSet ---------------------------------------------------------------------------------------------


def small_set() -> CalibrationSet:
    t = torch.tensor([999, 499, 999, 499, 999, 1])
    ehs = torch.arange(6.0).reshape(6, 1, 1).expand(6, 2, 3).contiguous()
    return CalibrationSet(
        torch.arange(6.0).reshape(6, 1, 1, 1),
        t,
        encoder_hidden_states=ehs,
        class_labels=torch.tensor([0, 1, 2, 3, 4, 5]),
        metadata={"seed": 0},
    )


def test_batches_group_by_timestep_and_cover_every_row_once() -> None:
    calib = small_set()
    batches = list(calib.batches(2))
    assert [(t, inputs["sample"].shape[0]) for t, inputs in batches] == [(999, 2), (999, 1), (499, 2), (1, 1)]
    assert calib.num_batches(2) == 4
    for t, inputs in batches:
        assert set(inputs) == {"sample", "timestep", "encoder_hidden_states", "class_labels"}
        assert inputs["timestep"].dim() == 1 and (inputs["timestep"] == t).all()
        assert torch.equal(inputs["encoder_hidden_states"][:, 0, 0], inputs["sample"].flatten())
        assert torch.equal(inputs["class_labels"].float(), inputs["sample"].flatten())
    rows = torch.cat([inputs["sample"].flatten() for _, inputs in batches])
    assert sorted(rows.tolist()) == list(range(6))
    assert calib.timesteps() == [1, 499, 999]
    assert calib.timestep_histogram() == {1: 1, 499: 2, 999: 3}
    with pytest.raises(ValueError, match="batch_size"):
        next(calib.batches(0))


def test_example_inputs_and_subset() -> None:
    calib = small_set()
    inputs = calib.example_inputs(3)
    assert inputs["sample"].shape == (3, 1, 1, 1) and inputs["timestep"].tolist() == [999] * 3
    with pytest.raises(ValueError, match="batch_size <= 3"):
        calib.example_inputs(4)
    sub = calib.subset(timesteps=[1, 499])
    assert sub.timestep_histogram() == {1: 1, 499: 2} and sub.metadata == calib.metadata
    assert sub.sample.flatten().tolist() == [1.0, 3.0, 5.0]
    with pytest.raises(ValueError, match="not in this set"):
        calib.subset(timesteps=[7])


def test_set_checks_its_shapes() -> None:
    with pytest.raises(ValueError, match="has 2 rows but sample has 3"):
        CalibrationSet(torch.zeros(3, 1, 2, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="N >= 1"):
        CalibrationSet(torch.zeros(0, 1, 2, 2), torch.zeros(0))
    with pytest.raises(TypeError, match="timestep must be a torch.Tensor"):
        CalibrationSet(torch.zeros(1, 1, 2, 2), [1])


def test_safetensors_round_trip(tmp_path) -> None:
    calib = collect(
        tiny_cond_unet(), EulerDiscreteScheduler(), encoder_hidden_states=torch.randn(2, 5, 16), guidance_scale=1.0
    )
    path = tmp_path / "calib.safetensors"
    calib.save(path)
    loaded = CalibrationSet.load(path)
    for name in ("sample", "timestep", "encoder_hidden_states", "step_index"):
        assert torch.equal(getattr(loaded, name), getattr(calib, name))
        assert getattr(loaded, name).dtype == getattr(calib, name).dtype
    assert loaded.class_labels is None
    assert loaded.metadata == calib.metadata
    assert loaded.metadata["scheduler"] == "EulerDiscreteScheduler" and loaded.metadata["seed"] == "0"


def test_load_refuses_files_that_are_not_ours(tmp_path) -> None:
    foreign = tmp_path / "weights.safetensors"
    save_file({"sample": torch.zeros(1, 1, 2, 2), "timestep": torch.zeros(1)}, str(foreign))
    with pytest.raises(ValueError, match="not a qdiff_ao calibration set"):
        CalibrationSet.load(foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        CalibrationSet.load(garbage)
    with pytest.raises(FileNotFoundError):
        CalibrationSet.load(tmp_path / "missing.safetensors")


# --- calibrate --------------------------------------------------------------------------------------------------


class Recorder(torch.nn.Module):
    """Records, per call, the published timestep and the timesteps of the batch it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.calls: list[tuple[object, list, int]] = []

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        self.calls.append((current_timestep(), timestep.tolist(), sample.shape[0]))
        return sample * self.scale


def test_calibrate_publishes_each_batch_timestep() -> None:
    calib = collect(tiny_unet(), EulerDiscreteScheduler(), samples_per_timestep=5)
    recorder = Recorder()
    calibrate(recorder, calib, batch_size=2, progress=False)
    assert len(recorder.calls) == calib.num_batches(2) == 5 * 3
    for published, batch_t, _ in recorder.calls:
        assert batch_t == [published] * len(batch_t)
    assert Counter(t for t, _, size in recorder.calls for _ in range(size)) == calib.timestep_histogram()
    assert current_timestep() is None


def test_calibrate_accepts_graph_modules_and_unets_and_checks_inputs() -> None:
    calib = collect(tiny_unet(), DDIMScheduler(), num_timesteps=2)
    gm = torch.fx.symbolic_trace(Recorder())
    calibrate(gm, calib, batch_size=4, progress=False)
    unet = tiny_unet()
    calls = count_calls(unet)
    calibrate(unet, calib, batch_size=4, progress=False)
    assert len(calls) == calib.num_batches(4) == 2
    with_text = CalibrationSet(calib.sample, calib.timestep, encoder_hidden_states=torch.zeros(len(calib), 1, 2))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        calibrate(gm, with_text, progress=False)
    with pytest.raises(TypeError, match="CalibrationSet"):
        calibrate(gm, {"sample": calib.sample}, progress=False)
