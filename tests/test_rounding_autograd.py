"""The hand-written AdaRound gradients (quantizers/rounding_autograd.py) against autograd's own expressions."""

from __future__ import annotations

from collections.abc import Callable

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qdiff_ao.quantizers.adaround import lp_loss
from qdiff_ao.quantizers.rounding_autograd import GAMMA, ZETA, abs_pow, rounding_regularizer, soft_weight
from tests.strategies import bits_and_range, float_tensors


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _value_and_grad(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                    weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = f(x)
    (y * weights).sum().backward() if y.dim() else (y * weights.sum()).backward()
    assert x.grad is not None
    return y.detach(), x.grad


def _assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 2e-5) -> None:
    atol = 1e-6 * float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@settings(deadline=None, max_examples=80)
@given(v=float_tensors(max_abs=12.0), bits=bits_and_range(), data=st.data())
def test_soft_weight_equals_the_autograd_expression(v: torch.Tensor, bits: tuple[int, bool, int, int],
                                                    data: st.DataObject) -> None:
    _, _, qmin, qmax = bits
    n = v.numel()
    # floor(W / s) mostly inside the code range, some outside (weights clipped by the range)
    w_floor = torch.tensor(data.draw(st.lists(st.integers(qmin - 2, qmax + 1), min_size=n, max_size=n)),
                           dtype=torch.float32)
    scale = torch.tensor(data.draw(st.floats(1e-4, 10.0)), dtype=torch.float32)
    zero = torch.tensor(float(data.draw(st.integers(0, 3) if qmin == 0 else st.just(0))))
    weights = torch.linspace(-1.0, 2.0, n)

    def reference(x: torch.Tensor) -> torch.Tensor:
        return (torch.clamp(w_floor + _h(x) + zero, qmin, qmax) - zero) * scale

    want, want_grad = _value_and_grad(reference, v, weights)
    got, got_grad = _value_and_grad(lambda x: soft_weight(x, w_floor, scale, zero, qmin, qmax), v, weights)
    assert torch.equal(got, want)  # the same operations in the same order
    _assert_close(got_grad, want_grad)
    assert torch.equal(got_grad == 0, want_grad == 0)  # the same clamp masks, bounds included


@settings(deadline=None, max_examples=80)
@given(v=float_tensors(max_abs=12.0), beta=st.floats(1.05, 20.0))
def test_rounding_regularizer_matches_autograd(v: torch.Tensor, beta: float) -> None:
    v[0] = -2.397895336151123  # h(V) exactly 0: a bound of the clamp
    weights = torch.ones(())

    def reference(x: torch.Tensor) -> torch.Tensor:
        return (1.0 - (2.0 * _h(x) - 1.0).abs().pow(beta)).sum()

    want, want_grad = _value_and_grad(reference, v, weights)
    got, got_grad = _value_and_grad(lambda x: rounding_regularizer(x, beta), v, weights)
    _assert_close(got, want)
    _assert_close(got_grad, want_grad, rtol=1e-4)  # exp(beta log t) vs pow: beta * |log t| float steps
    assert torch.isfinite(got_grad).all()


def test_rounding_regularizer_at_beta_one_or_below_is_autograds() -> None:
    v = torch.tensor([0.0, 1.0, -3.0, 20.0])
    for beta in (1.0, 0.5):
        want = (1.0 - (2.0 * _h(v) - 1.0).abs().pow(beta)).sum()
        assert torch.equal(rounding_regularizer(v, beta), want)


@settings(deadline=None, max_examples=80)
@given(x=float_tensors(max_abs=1e3), p=st.floats(1.05, 4.0))
def test_abs_pow_matches_pow_and_is_finite_at_zero(x: torch.Tensor, p: float) -> None:
    x[0] = 0.0
    weights = torch.linspace(0.5, 1.5, x.numel())
    want, want_grad = _value_and_grad(lambda t: t.abs().pow(p), x, weights)
    got, got_grad = _value_and_grad(lambda t: abs_pow(t, p), x, weights)
    _assert_close(got, want, rtol=1e-4)
    _assert_close(got_grad, want_grad, rtol=1e-4)
    assert float(got_grad[0]) == 0.0 and torch.isfinite(got_grad).all()


def test_lp_loss_uses_the_same_error_for_p_two_and_below_one() -> None:
    pred, target = torch.tensor([[1.0, -2.0], [0.5, 0.0]]), torch.zeros(2, 2)
    assert torch.equal(lp_loss(pred, target, 2.0), (pred * pred).sum(1).mean())
    assert torch.equal(lp_loss(pred, target, 0.5), pred.abs().pow(0.5).sum(1).mean())
