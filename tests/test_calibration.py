"""Tests for qdiff_ao.calibration.collection: timestep-uniform calibration data from the FP sampler."""

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
)
from hypothesis import given, settings
from hypothesis import strategies as st

from qdiff_ao.calibration.collection import select_step_indices
from tests.calibration_helpers import STEPS, collect, count_calls, sched_timesteps, tiny_cond_unet, tiny_unet

# --- step selection and coverage --------------------------------------------------------------------------------


def test_select_step_indices_matches_q_diffusion_and_ablations() -> None:
    assert select_step_indices(100, 20, "q_diffusion") == list(range(0, 100, 5))
    assert select_step_indices(10, 3, "q_diffusion") == [0, 3, 6]
    uniform = select_step_indices(100, 20, "uniform")
    assert uniform[0] == 0 and uniform[-1] == 99 and len(set(uniform)) == 20  # both ends of the trajectory
    assert all(4 <= b - a <= 6 for a, b in zip(uniform, uniform[1:]))
    assert select_step_indices(10, 10, "uniform") == list(range(10))
    assert select_step_indices(10, 3, "uniform") == [0, 5, 9]
    assert select_step_indices(10, 1, "uniform") == [0]
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
    # guidance pairs: -k / +k on the two rows of trajectory j at selected step p, k = p * 3 + j + 1
    assert calib.guidance_pair[:6].tolist() == [-1, -2, 1, 2, -3, 3]
    assert calib.guidance_pair[6:].tolist() == [-4, -5, 4, 5, -6, 6]
    assert calib.metadata["guidance_scale"] == "5.0"
    no_cfg = collect(
        unet, DDIMScheduler(), encoder_hidden_states=cond, guidance_scale=1.0, num_timesteps=2, samples_per_timestep=3
    )
    assert len(no_cfg) == 2 * 3 and no_cfg.guidance_pair is None
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
    # one negative per prompt: StableDiffusionPipeline.encode_prompt raises on a str beside a list of prompts
    assert seen == {"prompt": ["a", "abc"], "cfg": True, "negative": ["blurry", "blurry"]}
    assert calib.encoder_hidden_states[:, 0, 0].tolist() == [-1.0, -1.0, 1.0, 3.0]


# --- memory -----------------------------------------------------------------------------------------------------


def test_memory_estimate_is_exact_and_refusal_happens_before_sampling() -> None:
    unet = tiny_unet()
    calib = collect(unet, DDIMScheduler())  # x_t, t, step index and the UNet's output on each row
    assert calib.nbytes == len(calib) * (3 * 8 * 8 * 4 + 8 + 8 + 3 * 8 * 8 * 4)
    assert calib.bytes_per_sample == 2 * 3 * 8 * 8 * 4 + 16
    assert collect(unet, DDIMScheduler(), max_memory_bytes=calib.nbytes).float_output is not None  # exactly enough
    calib = collect(unet, DDIMScheduler(), record_float_output=False)  # the inputs alone decide the refusal
    assert calib.nbytes == len(calib) * (3 * 8 * 8 * 4 + 8 + 8)
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


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 400), st.data())
def test_uniform_steps_are_distinct_sorted_and_cover_both_ends(num_steps: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, num_steps))
    steps = select_step_indices(num_steps, k, "uniform")
    assert steps == sorted(set(steps)) and len(steps) == k
    assert steps[0] == 0 and (k == 1 or steps[-1] == num_steps - 1)
    if k > 1:  # gaps differ by at most one step: evenly spread
        gaps = [b - a for a, b in zip(steps, steps[1:])]
        assert max(gaps) - min(gaps) <= 1
