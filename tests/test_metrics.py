"""Tests for qdiff_ao.app.metrics (digits FD, noise-prediction error) and the bundled digits artifacts."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from qdiff_ao.app.bundled import CLASSIFIER_FILE, DIGITS_DDPM_DIR, DIGITS_FILE, load_digits_tensor
from qdiff_ao.app.metrics import (
    DigitsFD,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_statistics,
    noise_prediction_error,
    noise_prediction_offset,
)

needs_classifier = pytest.mark.skipif(
    not CLASSIFIER_FILE.is_file(), reason=f"{CLASSIFIER_FILE.name} not built yet (examples/train_classifier.py)"
)
needs_ddpm = pytest.mark.skipif(
    not (DIGITS_DDPM_DIR / "unet" / "diffusion_pytorch_model.safetensors").is_file(),
    reason="bundled digits DDPM not trained yet (examples/train_ddpm.py)",
)


def _gaussian_feats(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    return (torch.randn(n, d, generator=g) @ mix) * scale + shift


def _numpy_fd(a: np.ndarray, b: np.ndarray) -> float:
    """Direct route: eigenvalues of the non-symmetric product S_a S_b (real, >= 0 for PSD factors)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(s_a @ s_b)
    tr_covmean = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_covmean)


def test_fd_of_a_set_with_itself_is_zero() -> None:
    a = _gaussian_feats(400, 16, seed=1)
    mu, sigma = feature_statistics(a)
    assert frechet_distance(a, a) <= 1e-9 * float(sigma.trace())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fd_matches_direct_numpy_computation(seed: int) -> None:
    a = _gaussian_feats(300, 12, seed=seed)
    b = _gaussian_feats(250, 12, seed=seed + 100, shift=0.3, scale=1.7)
    expected = _numpy_fd(a.double().numpy(), b.double().numpy())
    assert expected > 1.0
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-8)  # symmetric


def test_fd_matches_scipy_sqrtm() -> None:
    linalg = pytest.importorskip("scipy.linalg")
    a = _gaussian_feats(300, 10, seed=5).double().numpy()
    b = _gaussian_feats(300, 10, seed=6, shift=-0.5, scale=0.6).double().numpy()
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b).real
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-7)


def test_fd_closed_form_for_diagonal_gaussians() -> None:
    """Diagonal S: d^2 = |mu_a - mu_b|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    var_a = torch.tensor([1.0, 4.0, 0.25, 9.0], dtype=torch.float64)
    var_b = torch.tensor([2.0, 1.0, 0.25, 0.0], dtype=torch.float64)  # a singular covariance too
    mu_a = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    mu_b = torch.tensor([1.0, 1.0, 0.0, 3.0], dtype=torch.float64)
    expected = float((mu_a - mu_b).square().sum() + (var_a.sqrt() - var_b.sqrt()).square().sum())
    got = frechet_distance_from_statistics(mu_a, torch.diag(var_a), mu_b, torch.diag(var_b))
    assert got == pytest.approx(expected, rel=1e-10)


def test_fd_of_a_pure_shift_is_the_squared_shift() -> None:
    a = _gaussian_feats(200, 8, seed=3)
    shift = torch.linspace(-1.0, 2.0, 8)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.square().sum()), rel=1e-7)


def test_fd_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(torch.randn(10), torch.randn(10, 1))
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(torch.randn(1, 4), torch.randn(10, 4))
    with pytest.raises(ValueError, match="widths differ"):
        frechet_distance(torch.randn(10, 4), torch.randn(10, 5))
    with pytest.raises(ValueError, match="sigma_b"):
        frechet_distance_from_statistics(torch.zeros(3), torch.eye(3), torch.zeros(3), torch.eye(4))


def test_digits_split_is_fixed_disjoint_and_in_range() -> None:
    assert DIGITS_FILE.is_file()
    train, y_train = load_digits_tensor("train", with_labels=True)
    heldout, y_held = load_digits_tensor("heldout", with_labels=True)
    everything = load_digits_tensor("all")
    assert train.shape == (1497, 1, 16, 16) and heldout.shape == (300, 1, 16, 16)
    assert everything.shape == (1797, 1, 16, 16)
    assert torch.equal(torch.bincount(y_held, minlength=10), torch.full((10,), 30))
    assert float(everything.min()) == -1.0 and float(everything.max()) == 1.0
    assert load_digits_tensor("heldout", size=8).shape == (300, 1, 8, 8)
    # the two splits partition the file: together they are "all", in some order
    assert torch.allclose(torch.cat([train, heldout]).flatten(1).sum(0), everything.flatten(1).sum(0), atol=1e-3)
    assert torch.equal(load_digits_tensor("train"), train)  # deterministic
    with pytest.raises(ValueError, match="split"):
        load_digits_tensor("test")


def test_runtime_imports_do_not_need_sklearn() -> None:
    code = (
        "import sys; import qdiff_ao.app.bundled, qdiff_ao.app.metrics; "
        "qdiff_ao.app.bundled.load_digits_tensor('heldout'); "
        "sys.exit(1 if any(m.startswith('sklearn') for m in sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@needs_classifier
def test_bundled_fd_real_small_noise_large() -> None:
    metric = DigitsFD.from_bundled()
    heldout, labels = load_digits_tensor("heldout", with_labels=True)
    assert metric.fd(heldout) < 1e-6
    assert metric.accuracy(heldout, labels) > 0.97
    train = load_digits_tensor("train")
    sub = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:300]]
    real_vs_real = metric.fd(sub)
    noise = torch.rand(300, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noise_fd = metric.fd(noise)
    assert 0 < real_vs_real < 150
    assert noise_fd > 20 * real_vs_real
    assert 0.95 < metric.mean_confidence(heldout) <= 1.0


@needs_classifier
def test_digits_fd_rejects_wrong_image_shape() -> None:
    metric = DigitsFD.from_bundled()
    with pytest.raises(ValueError, match=r"\(N, 1, 16, 16\)"):
        metric.fd(torch.zeros(10, 3, 16, 16))
    with pytest.raises(TypeError, match="torch.Tensor"):
        metric.fd(np.zeros((10, 1, 16, 16)))  # type: ignore[arg-type]


def _tiny_unet(seed: int):  # noqa: ANN202 - diffusers type
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def test_noise_prediction_error_known_answers() -> None:
    from diffusers import DDPMScheduler

    unet = _tiny_unet(0)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    same = noise_prediction_error(unet, unet, scheduler, num_samples=3, num_inference_steps=4)
    assert same.shape == (4,) and torch.equal(same, torch.zeros(4))

    def scaled(sample: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor]:
        return (1.1 * unet(sample, timestep).sample,)  # tuple output, like return_dict=False / a GraphModule

    err = noise_prediction_error(unet, scaled, scheduler, num_samples=3, num_inference_steps=4)
    assert torch.allclose(err, torch.full((4,), 0.1), atol=1e-5)
    other = noise_prediction_error(unet, _tiny_unet(1), scheduler, num_samples=3, num_inference_steps=4)
    assert bool((other > 0.05).all()) and bool(other.isfinite().all())


def test_noise_prediction_offset_known_answers() -> None:
    from diffusers import DDPMScheduler

    unet = _tiny_unet(0)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    same = noise_prediction_offset(unet, unet, scheduler, num_samples=3, num_inference_steps=4)
    assert same.shape == (4, 1) and torch.equal(same, torch.zeros(4, 1))

    def shifted(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return unet(sample, timestep).sample + 0.25

    offset = noise_prediction_offset(unet, shifted, scheduler, num_samples=3, num_inference_steps=4)
    assert torch.allclose(offset, torch.full((4, 1), 0.25), atol=1e-5)
    with pytest.raises(ValueError, match="must be >= 1"):
        noise_prediction_offset(unet, unet, scheduler, num_samples=0)


@needs_ddpm
def test_bundled_ddpm_loads_from_package_path() -> None:
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(DIGITS_DDPM_DIR, subfolder="unet").eval()
    scheduler = DDPMScheduler.from_pretrained(DIGITS_DDPM_DIR, subfolder="scheduler")
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.prediction_type == "epsilon"
    assert "AttnDownBlock2D" in unet.config.down_block_types
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = unet(x, torch.tensor([999, 10])).sample
    assert out.shape == (2, 1, 16, 16) and bool(out.isfinite().all())
    # a trained epsilon model predicts unit-variance noise from nearly pure noise at t = 999
    assert 0.5 < float(out[0].std()) < 1.5
    assert sum(p.numel() for p in unet.parameters()) * 4 < 8 * 2**20
