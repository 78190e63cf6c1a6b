"""Operator fused_attention_layernorm: the references of attention_input and attention_output against
plainer float64 formulations, gradcheck, and the public functions' input checks."""
import math

import pytest
import torch

import hstu_kernels
from hstu_kernels.dropout import seeded_dropout_mask
from hstu_kernels.reference.attention_layernorm import attention_output

f64 = torch.float64


def test_attention_output_hand_computed():
    # LayerNorm([1, 3]) = [-1, 1] (eps 0); times u = [2, 5] -> [-2, 5]; W rows [1, 0] and [1, 1] -> [-2, 3].
    x = torch.tensor([[10.0, 20.0]], dtype=f64)
    attn = torch.tensor([[1.0, 3.0]], dtype=f64)
    u = torch.tensor([[2.0, 5.0]], dtype=f64)
    weight = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=f64)
    bias = torch.tensor([0.5, -1.0], dtype=f64)
    out = attention_output(x, attn, u, weight, bias, dropout_p=0.2, training=False, eps=0.0)
    torch.testing.assert_close(out, torch.tensor([[8.5, 22.0]], dtype=f64))


def attention_output_by_formula(x, attn, u, weight, bias, eps, keep=None, p=0.0):
    """Float64 restatement: explicit mean / biased variance, explicit dropout mask, explicit matmul."""
    x, attn, u, weight = x.double(), attn.double(), u.double(), weight.double()
    mean = attn.mean(-1, keepdim=True)
    var = ((attn - mean) ** 2).mean(-1, keepdim=True)
    gated = (attn - mean) / torch.sqrt(var + eps) * u
    if keep is not None:
        gated = gated * keep / (1 - p)
    out = x + gated @ weight.T
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 4, 3), (7, 16, 5), (33, 50, 50), (0, 8, 4)])
def test_attention_output_matches_formula(dtype, tol, with_bias, shape):
    rows, width, dim = shape
    gen = torch.Generator().manual_seed(rows * 100 + width)
    x, attn, u = (torch.randn(rows, n, generator=gen, dtype=dtype) for n in (dim, width, width))
    weight = torch.randn(dim, width, generator=gen, dtype=dtype) / math.sqrt(width)
    bias = torch.randn(dim, generator=gen, dtype=dtype) if with_bias else None
    out = attention_output(x, attn, u, weight, bias, dropout_p=0.0, training=True)
    expected = attention_output_by_formula(x, attn, u, weight, bias, 1e-6)
    assert out.dtype == dtype and out.shape == (rows, dim)
    torch.testing.assert_close(out.double(), expected, atol=tol * 10, rtol=tol)


def test_attention_output_seeded_dropout_is_reproducible_and_matches_mask():
    gen = torch.Generator().manual_seed(0)
    x, attn, u = (torch.randn(6, n, generator=gen, dtype=f64) for n in (4, 8, 8))
    weight, bias = torch.randn(4, 8, generator=gen, dtype=f64), torch.randn(4, generator=gen, dtype=f64)
    out = attention_output(x, attn, u, weight, bias, dropout_p=0.4, training=True, seed=5)
    again = attention_output(x, attn, u, weight, bias, dropout_p=0.4, training=True, seed=5)
    other = attention_output(x, attn, u, weight, bias, dropout_p=0.4, training=True, seed=6)
    keep = seeded_dropout_mask((6, 8), 0.4, 5).double()
    assert torch.equal(out, again) and not torch.equal(out, other)
    torch.testing.assert_close(out, attention_output_by_formula(x, attn, u, weight, bias, 1e-6, keep, 0.4))


@pytest.mark.parametrize("seed", [None, 9])
def test_attention_output_gradcheck(seed):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, generator=gen, dtype=f64, requires_grad=True)
    attn = torch.randn(3, 4, generator=gen, dtype=f64, requires_grad=True)
    u = torch.randn(3, 4, generator=gen, dtype=f64, requires_grad=True)
    weight = torch.randn(3, 4, generator=gen, dtype=f64, requires_grad=True)
    bias = torch.randn(3, generator=gen, dtype=f64, requires_grad=True)
    p, training = (0.0, False) if seed is None else (0.5, True)
    fn = lambda *args: attention_output(*args, dropout_p=p, training=training, seed=seed)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, attn, u, weight, bias))
    assert torch.autograd.gradgradcheck(fn, (x, attn, u, weight, bias))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_attention_output_rejects_bad_shapes(backend):
    """The checks run in the dispatch layer, before any backend."""
    x, attn = torch.zeros(2, 3), torch.zeros(2, 4)
    check = lambda *args, p=0.0: hstu_kernels.attention_output(  # noqa: E731
        *args, dropout_p=p, training=False, backend=backend)
    with pytest.raises(ValueError, match="attn and u must both be"):
        check(x, attn, torch.zeros(2, 5), torch.zeros(3, 4), None)
    with pytest.raises(ValueError, match=r"weight must be \[D=3, H\*dv=4\]"):
        check(x, attn, attn, torch.zeros(4, 3), None)
    with pytest.raises(ValueError, match="bias must be"):
        check(x, attn, attn, torch.zeros(3, 4), torch.zeros(4))
    with pytest.raises(ValueError, match="x must be"):
        check(torch.zeros(3, 3), attn, attn, torch.zeros(3, 4), None)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        check(x, attn, attn, torch.zeros(3, 4), None, p=1.5)


# --------------------------------------------------------------------------- attention_input


def test_attention_input_matches_formula():
    gen = torch.Generator().manual_seed(3)
    x, weight = torch.randn(7, 5, generator=gen, dtype=f64), torch.randn(5, 12, generator=gen, dtype=f64)
    mean = x.mean(-1, keepdim=True)
    normed = (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + 1e-6)
    projected = normed @ weight
    expected = projected * torch.sigmoid(projected)
    out = hstu_kernels.attention_input(x, weight, eps=1e-6, backend="reference")
    torch.testing.assert_close(out, expected)


def test_attention_input_gradcheck():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, generator=gen, dtype=f64, requires_grad=True)
    weight = torch.randn(3, 6, generator=gen, dtype=f64, requires_grad=True)
    fn = lambda x, w: hstu_kernels.attention_input(x, w, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight))


def test_attention_input_rejects_bad_shapes():
    with pytest.raises(ValueError, match="must share D"):
        hstu_kernels.attention_input(torch.zeros(2, 3), torch.zeros(4, 6), backend="reference")
    with pytest.raises(ValueError, match="eps must be > 0"):
        hstu_kernels.attention_input(torch.zeros(2, 3), torch.zeros(3, 6), eps=0.0, backend="reference")


