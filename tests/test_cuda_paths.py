"""The library's stages with the model on a CUDA device (skipped without one): observers, the one-call recipe.

CI has no GPU; these run on the lent GPU machine (see README, "GPU"). They compare each CUDA run with the same
run on CPU, so a tensor created on the wrong device (an error) or a stage silently skipped (a different result)
shows up.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import qdiff_ao
from qdiff_ao.observers import timestep_context

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ACT = dict(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=255)


def _observers() -> dict[str, Any]:
    return {
        "minmax": qdiff_ao.RangeMinMaxObserver(**ACT),
        "ema": qdiff_ao.EMAMinMaxObserver(**ACT),
        "lp": qdiff_ao.LpObserver(**ACT),
        "per_channel_lp": qdiff_ao.PerChannelLpObserver(dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                                        quant_min=-128, quant_max=127, ch_axis=0),
        "softmax": qdiff_ao.SoftmaxObserver(**ACT),
        "timestep_lp": qdiff_ao.TimestepAwareObserver(qdiff_ao.LpObserver(**ACT)),
    }


@pytest.mark.parametrize("name", sorted(_observers()))
def test_observer_on_cuda_matches_cpu(name: str) -> None:
    """Same batches on CPU and on CUDA give the same qparams; after a reset the state stays on the device."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 6, 5, generator=g) * (i + 1) for i in range(3)]
    if name == "softmax":
        batches = [torch.softmax(b, dim=-1) for b in batches]
    cpu, gpu = _observers()[name], _observers()[name].cuda()
    for t, b in zip((900, 500, 100), batches):
        with timestep_context(t):
            cpu(b)
            gpu(b.cuda())
    (s_cpu, z_cpu), (s_gpu, z_gpu) = cpu.calculate_qparams(), gpu.calculate_qparams()
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, rtol=1e-4, atol=0.0)
    assert (z_gpu.cpu() - z_cpu).abs().max() <= 1
    gpu.reset_min_max_vals()
    with timestep_context(50):
        gpu(batches[0].cuda())
    assert all(b.device.type == "cuda" for b in gpu.buffers())


def test_quantize_recipe_on_cuda() -> None:
    """The default recipe (collection, fallback, reconstruction, timestep groups, output correction) with the
    float UNet on CUDA returns a CPU model (x86 kernels) about as accurate as the CPU run's."""
    from diffusers import DDPMScheduler

    from tests.distributed_worker import RECON, eps_error
    from tests.unet_factory import build_unet

    cfg = qdiff_ao.QuantConfig(reconstruction=qdiff_ao.ReconstructionConfig(**RECON))
    collect = dict(num_inference_steps=6, num_timesteps=3, samples_per_timestep=8, batch_size=4, seed=3,
                   progress=False)
    unet = build_unet("attn")
    on_cpu = qdiff_ao.quantize(copy.deepcopy(unet), DDPMScheduler(num_train_timesteps=1000), cfg, **collect)
    on_gpu = qdiff_ao.quantize(copy.deepcopy(unet).cuda(), DDPMScheduler(num_train_timesteps=1000), cfg,
                               **collect)
    err_cpu, err_gpu = eps_error(on_cpu)[0], eps_error(on_gpu)[0]  # vs build_unet("attn"), the same float UNet
    print(f"eps error vs FP: cpu run {err_cpu:.4f}, cuda run {err_gpu:.4f}")
    assert err_gpu < 1.25 * err_cpu + 0.01
    assert on_gpu.quantization_info["reconstruction"] is not None
    assert on_gpu.quantization_info["bias_correction"] is not None
