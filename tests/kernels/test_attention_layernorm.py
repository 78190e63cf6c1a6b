"""Operator fused_attention_layernorm: the references of attention_input and attention_output against
plainer float64 formulations, gradcheck, and the public functions' input checks."""
import math

import pytest
import torch

import hstu_kernels
from hstu_kernels.dropout import seeded_dropout_mask
from hstu_kernels.layout import aligned_rows, aligned_width
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
    with pytest.raises(ValueError, match="eps must be > 0"):
        hstu_kernels.attention_output(x, attn, attn, torch.zeros(3, 4), None, dropout_p=0.0, training=False, eps=0.0,
                                      backend=backend)
    half = attn.half()
    with pytest.raises(TypeError, match="outside autocast attn, u, weight, bias must share a dtype; got attn float16, "
                                        "u float16, weight float32, bias float32"):
        check(x, half, half, torch.zeros(3, 4), torch.zeros(3))
    with pytest.raises(TypeError, match="got attn float32, u float32, weight float32, bias float16"):
        check(x, attn, attn, torch.zeros(3, 4), torch.zeros(3).half())


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
    with pytest.raises(TypeError, match="outside autocast x, weight must share a dtype; got x float16, weight float32"):
        hstu_kernels.attention_input(torch.zeros(2, 3).half(), torch.zeros(3, 6), backend="reference")
    with torch.autocast("cpu", dtype=torch.float16):  # autocast casts the operands
        assert hstu_kernels.attention_input(torch.zeros(2, 3).half(), torch.zeros(3, 6), backend="reference").shape == (2, 6)




# --------------------------------------------------------------------------------------------- Triton backend
# Accuracy rule (as for the attention, ``assert_within_rule``): max|out - ref| <= 2 * max|out_torch - ref|
# + atol + one rounding step of the output dtype, with ref the reference in float64 on the same
# (rounded) inputs and out_torch the reference in the test dtype (under autocast where the test is).
# On CPU the kernels run in the Triton interpreter in fp32 and fp16; bf16 and full sizes under ``gpu``.
import importlib  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402

from hypothesis import given, strategies as st  # noqa: E402
from cases import deterministic_algorithms  # noqa: E402
from cases import needs_triton as needs_triton_for  # noqa: E402
from test_hstu_attention import assert_within_rule  # noqa: E402

from hstu_kernels.manager import TritonOperatorManager  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
OP = "fused_attention_layernorm"
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
DIMS = [1, 3, 16, 25, 50, 64]
# Gate widths 7 and 15 leave a one-column padding tail (the ones column alone); D = 33 and 65 leave one
# element in the last of the interpreter's 32-wide chunks (the input prologue's statistics). 65 is past the
# fused projection's limit (64), so problems drawn there take the cuBLAS projection.
OUTPUT_DIMS = sorted(DIMS + [7, 15, 33, 65])
INPUT_DIMS = sorted(DIMS + [33, 65])


def triton_module():
    return importlib.import_module("hstu_kernels.triton.attention_layernorm")


needs_triton = needs_triton_for(OP)


@dataclass(frozen=True)
class OutputProblem:
    """One attention_output call, described by plain values so hypothesis can print a failing example."""

    rows: int
    dim: int  # D
    width: int  # H * dv
    dtype: torch.dtype = torch.float32  # the activations' (attn, u); x, W, b too unless ``autocast``
    dropout_p: float = 0.0
    training: bool = True
    bias: bool = True
    projection: str = "fused"
    strided_u: bool = False  # u as a slice of a wider [L, 3 * width] tensor
    model_layout: bool = False  # as the model calls it: attn in the attention's padded rows, u the first slice of
    # [L, 4 * width] (the STU projection); at widths that are not multiples of 8 the gate reads past the width
    x_view: str = "contiguous"  # or "transposed" (x = [D, L].T) or "every_other" (x = [L, 2D][:, ::2])
    autocast: bool = False  # x, W, b in fp32 and the call under autocast to ``dtype``
    attn_scale: float = 2.0  # attn = attn_shift + attn_scale * randn: 1e-3 gives near-constant rows
    attn_shift: float = 0.5
    eps: float = 1e-6
    seed: int = 0


def output_inputs(p: OutputProblem, dtype: torch.dtype, device=DEVICE):
    """(x, attn, u, weight, bias, leaves): drawn in float64 and rounded to the problem's dtypes (x, W, b
    to fp32 under autocast), then kept in those dtypes or, for the exact reference, in float64."""
    g = torch.Generator().manual_seed(p.seed)
    wide = torch.float32 if p.autocast else p.dtype

    def values(*shape, kind, scale=1.0, shift=0.0):
        rounded = (torch.randn(*shape, generator=g, dtype=f64) * scale + shift).to(kind)
        return rounded.to(f64 if dtype == f64 else kind).to(device).requires_grad_()

    if p.x_view == "transposed":
        leaf_x = values(p.dim, p.rows, kind=wide)
        x = leaf_x.T
    elif p.x_view == "every_other":
        leaf_x = values(p.rows, 2 * p.dim, kind=wide)
        x = leaf_x[:, ::2]
    else:
        leaf_x = x = values(p.rows, p.dim, kind=wide)
    attn_stride = aligned_width(p.width) if p.model_layout else p.width
    leaf_attn = values(p.rows, attn_stride, kind=p.dtype, scale=p.attn_scale, shift=p.attn_shift)
    attn = leaf_attn[:, :p.width]
    wide_u = values(p.rows, (4 if p.model_layout else 3) * p.width, kind=p.dtype)
    if p.model_layout:
        u = wide_u[:, :p.width]
        with torch.no_grad():  # what the gate reads past the width must not reach any result
            leaf_attn[:, p.width:] = float("nan")
            wide_u[:, p.width:] = float("nan")
    elif p.strided_u:
        u = wide_u[:, p.width:2 * p.width]
    else:
        u = wide_u[:, :p.width].detach().contiguous().requires_grad_()
    weight = values(p.dim, p.width, kind=wide, scale=1.0 / math.sqrt(max(p.width, 1)))
    bias = values(p.dim, kind=wide) if p.bias else None
    leaves = {"x": leaf_x, "attn": leaf_attn, "u": wide_u if p.strided_u or p.model_layout else u, "weight": weight}
    if bias is not None:
        leaves["bias"] = bias
    return x, attn, u, weight, bias, leaves


def autocast_to(dtype, enabled):
    return torch.autocast(DEVICE.type, dtype=dtype, enabled=enabled)


def run_output(p: OutputProblem, backend: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    x, attn, u, weight, bias, leaves = output_inputs(p, dtype)
    kwargs = dict(dropout_p=p.dropout_p, training=p.training, seed=p.seed, eps=p.eps)
    with autocast_to(p.dtype, p.autocast and dtype != f64):
        if backend == "triton":
            out = triton_module().attention_output_with(x, attn, u, weight, bias, projection=p.projection, **kwargs)
        else:
            out = hstu_kernels.attention_output(x, attn, u, weight, bias, backend="reference", **kwargs)
    g = torch.Generator().manual_seed(p.seed + 1)
    grad_out = torch.randn(out.shape, generator=g, dtype=f64).to(p.dtype).to(out.dtype).to(out.device)
    # The reference's dropout with p = 1 returns zeros that do not depend on attn and u at all.
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out, allow_unused=True, materialize_grads=True)
    return {"out": out.detach(), **{f"grad_{name}": t for name, t in zip(leaves, grads)}}


def check_output_against_reference(p: OutputProblem):
    ref = run_output(p, "reference", f64)
    torch_same = run_output(p, "reference", p.dtype)
    got = run_output(p, "triton", p.dtype)
    for name in ref:
        assert got[name].dtype == torch_same[name].dtype, f"{name}: dtype {got[name].dtype}, reference {torch_same[name].dtype}"
        assert_within_rule(name, got[name], torch_same[name], ref[name])


@dataclass(frozen=True)
class InputProblem:
    rows: int
    dim: int  # D
    cols: int  # E
    dtype: torch.dtype = torch.float32
    keep_pre: bool = False
    normalization: str = "prologue"  # or "kernel": the wide-row path (LayerNorm kernels, plain matmuls, cuBLAS)
    autocast: bool = False
    offset: float = 0.0  # a common offset of every x row (LayerNorm removes it)
    scale: float = 1.0  # x = offset + scale * randn: 1e-3 gives near-constant rows
    eps: float = 1e-6
    seed: int = 0


def run_input(p: InputProblem, backend: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(p.seed)
    wide = torch.float32 if p.autocast else p.dtype
    cast = dtype if dtype == f64 else wide
    x = (torch.randn(p.rows, p.dim, generator=g, dtype=f64) * p.scale + p.offset).to(wide).to(cast)
    x = x.to(DEVICE).requires_grad_()
    weight = (torch.randn(p.dim, p.cols, generator=g, dtype=f64) / math.sqrt(max(p.dim, 1))).to(wide).to(cast)
    weight = weight.to(DEVICE).requires_grad_()
    with autocast_to(p.dtype, p.autocast and dtype != f64):
        if backend == "triton":
            out = triton_module().attention_input_with(x, weight, eps=p.eps, keep_pre=p.keep_pre,
                                                       normalization=p.normalization)
        else:
            out = hstu_kernels.attention_input(x, weight, eps=p.eps, backend="reference")
        grad_out = torch.randn(out.shape, generator=g, dtype=f64).to(p.dtype).to(out.dtype).to(out.device)
        grads = torch.autograd.grad(out, [x, weight], grad_out)
    return {"out": out.detach(), "grad_x": grads[0], "grad_weight": grads[1]}


def check_input_against_reference(p: InputProblem):
    ref = run_input(p, "reference", f64)
    torch_same = run_input(p, "reference", p.dtype)
    got = run_input(p, "triton", p.dtype)
    for name in ref:
        assert got[name].dtype == torch_same[name].dtype, f"{name}: dtype {got[name].dtype}, reference {torch_same[name].dtype}"
        assert_within_rule(name, got[name], torch_same[name], ref[name])


@st.composite
def output_problems(draw):
    dim, width = draw(st.sampled_from(OUTPUT_DIMS)), draw(st.sampled_from(OUTPUT_DIMS))
    fused_fits = max(dim, width) <= triton_module().FUSED_OUTPUT_WIDTH_LIMIT
    return OutputProblem(
        rows=draw(st.sampled_from([0, 1, 2, 7, 33])),
        dim=dim,
        width=width,
        dtype=draw(st.sampled_from([torch.float32, torch.float16])),
        dropout_p=draw(st.sampled_from([0.0, 0.3, 1.0])),
        training=draw(st.booleans()),
        bias=draw(st.booleans()),
        projection=draw(st.sampled_from(["fused", "cublas"] if fused_fits else ["cublas"])),
        strided_u=draw(st.booleans()),
        model_layout=draw(st.booleans()),
        x_view=draw(st.sampled_from(["contiguous", "transposed", "every_other"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@st.composite
def input_problems(draw):
    return InputProblem(
        rows=draw(st.sampled_from([0, 1, 2, 7, 33])),
        dim=draw(st.sampled_from(INPUT_DIMS)),
        cols=draw(st.sampled_from([1, 3, 16, 50, 100])),
        dtype=draw(st.sampled_from([torch.float32, torch.float16])),
        keep_pre=draw(st.booleans()),
        normalization=draw(st.sampled_from(["prologue", "kernel"])),
        offset=draw(st.sampled_from([0.0, 100.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@needs_triton
@given(p=output_problems())
def test_triton_output_matches_reference_random_shapes(p: OutputProblem):
    """Output and the gradients of x, attn, u, W, b: empty and one-row inputs, non-power-of-2 widths,
    dropout off / on / p = 1, with and without bias, both projections, u a strided slice, x a view
    whose columns are not unit-stride."""
    check_output_against_reference(p)


@needs_triton
@given(p=input_problems())
def test_triton_input_matches_reference_random_shapes(p: InputProblem):
    """Output and the gradients of x and W: the pre-activation kept or recomputed, x normalised in the
    matmul's prologue or by a LayerNorm kernel, rows with a large common offset."""
    check_input_against_reference(p)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("projection", ["fused", "cublas"])
def test_triton_output_several_row_and_column_blocks(dtype, projection):
    """More rows than one program holds (70: over the interpreter's 64-row row kernels and five of the fused
    projection's 16-row blocks), width 50 (a masked gate tile)."""
    check_output_against_reference(OutputProblem(rows=70, dim=50, width=50, dtype=dtype, dropout_p=0.25,
                                                 projection=projection, strided_u=True, seed=3))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("keep_pre", [False, True])
@pytest.mark.parametrize("normalization", ["prologue", "kernel"])
def test_triton_input_several_row_and_column_blocks(dtype, keep_pre, normalization):
    """Rows over two programs, D = 50 in two chunks of the interpreter's 32 and E = 100 in two or four
    column blocks: the chunked LayerNorm prologue and every backward path."""
    check_input_against_reference(InputProblem(rows=70, dim=50, cols=100, dtype=dtype, keep_pre=keep_pre,
                                               normalization=normalization, seed=4))


@needs_triton
@pytest.mark.parametrize("width", [7, 50, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("projection", ["fused", "cublas"])
def test_triton_output_in_the_models_layout(width, dtype, projection):
    """attn in the attention's padded rows and u followed by v (NaN past the width): at widths that are
    not multiples of 8 the gate reads and writes whole padded rows; results and gradients as the
    reference's, and the gradients of attn and u are views of padded rows too."""
    check_output_against_reference(OutputProblem(rows=37, dim=24, width=width, dtype=dtype, dropout_p=0.3,
                                                 projection=projection, model_layout=True, seed=width))
    attn = aligned_rows(37, width, dtype, DEVICE).normal_()
    u = torch.randn(37, 4 * width, dtype=dtype, device=DEVICE)[:, :width]
    grad = aligned_rows(37, width, dtype, DEVICE).normal_()
    for got in triton_module().gate_backward(grad, attn, u, None, 0.0, 1e-6):
        assert got.shape == (37, width) and got.stride() == (aligned_width(width), 1)


@needs_triton
@pytest.mark.parametrize("width", [7, 15, 23])
@pytest.mark.parametrize("projection", ["fused", "cublas"])
def test_triton_output_one_column_padding_tail(width, projection, monkeypatch):
    """Widths of 7 mod 8: the gated rows' padding after the K values is the ones column alone (tail 1),
    which carries the bias into the output (cuBLAS) and db. New buffers NaN-filled, so a ones column
    left unwritten shows even where the uninitialised memory happens to hold a one."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS refuses deterministic mode without it
    p = OutputProblem(rows=9, dim=16, width=width, projection=projection, seed=width)
    with deterministic_algorithms():
        check_output_against_reference(p)


@needs_triton
@pytest.mark.parametrize("dim", [33, 65])
@pytest.mark.parametrize("keep_pre", [False, True])
def test_triton_input_prologue_last_chunk_of_one_element(dim, keep_pre):
    """D = 33 and 65 over the interpreter's 32-wide chunks (and the GPU's fp32 ones): the prologue's row
    statistics take in the last chunk, which holds one element."""
    check_input_against_reference(InputProblem(rows=9, dim=dim, cols=16, keep_pre=keep_pre,
                                               normalization="prologue", seed=dim))


# Where eps sits: F.layer_norm's (the reference's) 1 / sqrt(var + eps). 1 / (sqrt(var) + eps) is off by
# about sqrt(2) on rows of spread 1e-3 at eps = 1e-6 (var = eps), and on ordinary rows at eps = 0.5.
# The tiny-spread rows sit around 0: around an offset the row kernels' plain mean is less accurate than
# torch's (test_triton_rows_with_a_common_offset).
EPS_CASES = [pytest.param(1e-3, 0.0, 1e-6, id="tiny-spread-rows"), pytest.param(1.0, 0.5, 0.5, id="large-eps")]


@needs_triton
@pytest.mark.xfail(strict=True, reason="the row kernels' plain two-pass mean loses up to 2x the accuracy rule on rows "
                                       "far from zero against their spread (kernels/triton/attention_layernorm_notes.md, "
                                       "Limits); a corrected sum fixes it but slows the gate 4-10% (notes, Tried and rejected)")
@pytest.mark.parametrize("seed", [0, 10, 11, 12, 34])  # draws where the plain mean fails the rule
def test_triton_rows_with_a_common_offset(seed):
    """Rows far from zero against their spread (offset 100, spread 1; offset 0.5, spread 1e-3), against
    the reference's F.layer_norm."""
    check_input_against_reference(InputProblem(rows=1, dim=3, cols=3, normalization="kernel", offset=100.0,
                                               seed=6417353 + seed))
    check_output_against_reference(OutputProblem(rows=9, dim=16, width=25, attn_scale=1e-3, attn_shift=0.5,
                                                 seed=seed))


@needs_triton
@pytest.mark.parametrize("scale,shift,eps", EPS_CASES)
@pytest.mark.parametrize("projection", ["fused", "cublas"])
def test_triton_output_eps_inside_the_square_root(scale, shift, eps, projection):
    """attn rows shift + scale * randn, eps passed through: output and every gradient (the gate's
    forward and backward both normalise) against the reference's F.layer_norm."""
    check_output_against_reference(OutputProblem(rows=9, dim=16, width=25, projection=projection,
                                                 attn_scale=scale, attn_shift=shift, eps=eps, seed=12))


@needs_triton
@pytest.mark.parametrize("scale,shift,eps", EPS_CASES)
@pytest.mark.parametrize("normalization", ["prologue", "kernel"])
def test_triton_input_eps_inside_the_square_root(scale, shift, eps, normalization):
    """x rows shift + scale * randn, eps passed through, both normalisations (the prologue's statistics
    and the LayerNorm kernel)."""
    check_input_against_reference(InputProblem(rows=9, dim=25, cols=16, normalization=normalization, offset=shift,
                                               scale=scale, eps=eps, seed=13))


@needs_triton
@pytest.mark.parametrize("x_view", ["transposed", "every_other"])
@pytest.mark.parametrize("projection", ["fused", "cublas"])
def test_triton_output_residual_with_non_unit_column_stride(x_view, projection):
    """x a view whose columns are not unit-stride (the fused launcher copies it to unit-stride columns,
    cuBLAS takes it as it is)."""
    p = OutputProblem(rows=9, dim=50, width=16, projection=projection, x_view=x_view, seed=14)
    x = output_inputs(p, p.dtype)[0]
    assert x.stride(1) != 1
    check_output_against_reference(p)


@needs_triton
def test_triton_dropout_mask_is_the_seeded_mask_bit_for_bit():
    """Dropped elements are exactly those of seeded_dropout_mask (one Philox evaluation per eight columns),
    in the forward (zeros of the gate) and in the backward (zeros of du), kept ones scaled by 1/(1-p)."""
    module = triton_module()
    g = torch.Generator().manual_seed(5)
    attn = (torch.randn(23, 50, generator=g) + 0.5).to(DEVICE).requires_grad_()
    u = (torch.rand(23, 50, generator=g) + 1.0).to(DEVICE).requires_grad_()
    keep = seeded_dropout_mask((23, 50), 0.4, 77, DEVICE)
    gated = module.attention_gate(attn, u, dropout_p=0.4, training=True, seed=77)
    expected = torch.nn.functional.layer_norm(attn, (50,), eps=1e-6) * u / 0.6
    assert torch.equal(gated != 0, keep)
    torch.testing.assert_close(gated[keep], expected[keep])
    (du,) = torch.autograd.grad(gated, [u], torch.ones_like(gated))
    assert torch.equal(du != 0, keep)


@needs_triton
def test_triton_drawn_seed_same_mask_forward_and_backward_new_mask_each_call():
    """seed=None draws a device seed per call: masks differ between calls, and each backward uses its
    own forward's mask."""
    module = triton_module()
    attn = torch.randn(16, 64, device=DEVICE).requires_grad_()
    u = (torch.rand(16, 64, device=DEVICE) + 1.0).requires_grad_()
    first = module.attention_gate(attn, u, dropout_p=0.5, training=True)
    second = module.attention_gate(attn, u, dropout_p=0.5, training=True)
    assert not torch.equal(first != 0, second != 0)
    (du,) = torch.autograd.grad(first, [u], torch.ones_like(first))
    assert torch.equal(du != 0, first != 0)


@needs_triton
@pytest.mark.parametrize("projection", ["fused", "cublas"])
def test_triton_output_autocast_dtypes_and_values(projection):
    """Under autocast (fp16 here; bf16 on the GPU): x, W, b in fp32, attn and u in fp16. The output and
    every gradient have the reference's dtypes under autocast and meet the rule against it."""
    p = OutputProblem(rows=19, dim=25, width=50, dtype=torch.float16, dropout_p=0.2, projection=projection,
                      strided_u=True, autocast=True, seed=6)
    got = run_output(p, "triton", p.dtype)
    assert got["out"].dtype == torch.float32 and got["grad_attn"].dtype == torch.float16
    assert got["grad_weight"].dtype == torch.float32 and got["grad_bias"].dtype == torch.float32
    check_output_against_reference(p)


@needs_triton
@pytest.mark.parametrize("normalization", ["prologue", "kernel"])
def test_triton_input_autocast_dtypes_and_values(normalization):
    p = InputProblem(rows=19, dim=25, cols=40, dtype=torch.float16, autocast=True, normalization=normalization, seed=7)
    got = run_input(p, "triton", p.dtype)
    assert got["out"].dtype == torch.float16 and got["grad_x"].dtype == torch.float32
    assert got["grad_weight"].dtype == torch.float32
    check_input_against_reference(p)


@needs_triton
@pytest.mark.parametrize("projection", ["fused", "cublas"])
def test_triton_poisoned_buffers_fully_written_and_bitwise_repeatable(projection, monkeypatch):
    """With every new buffer NaN-filled (deterministic mode), outputs and gradients stay finite and
    right (the gated rows' ones column and padding, which the weight-gradient matmul reads, included);
    two runs give the same bits (no atomics)."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS refuses deterministic mode without it
    p = OutputProblem(rows=21, dim=25, width=50, dropout_p=0.3, projection=projection, seed=8)
    q = InputProblem(rows=21, dim=25, cols=50, seed=8)
    with deterministic_algorithms():
        outputs = [run_output(p, "triton", p.dtype), run_output(p, "triton", p.dtype)]
        inputs = [run_input(q, "triton", q.dtype), run_input(replace(q, normalization="kernel"), "triton", q.dtype)]
    for name in outputs[0]:
        assert torch.equal(outputs[0][name], outputs[1][name]), f"{name} differs between two runs"
    check_output_against_reference(p)
    for got in inputs:
        ref, torch_same = run_input(q, "reference", f64), run_input(q, "reference", q.dtype)
        for name in ref:
            assert_within_rule(name, got[name], torch_same[name], ref[name])


@needs_triton
def test_triton_custom_ops_opcheck():
    """torch.library.opcheck on every custom op (schema, fake, autograd registration, AOT dispatch)."""
    triton_module()
    ops = torch.ops.hstu_kernels
    g = torch.Generator().manual_seed(9)
    x, attn, u = (torch.randn(9, n, generator=g).to(DEVICE) for n in (25, 50, 50))
    weight, bias = torch.randn(25, 50, generator=g).to(DEVICE), torch.randn(25, generator=g).to(DEVICE)
    seed = torch.tensor(3, device=DEVICE)
    for projection, keep_gated in (("fused", True), ("fused", False), ("cublas", True)):
        # without the gated rows no weight gradient can be asked for: W and b are frozen there
        frozen = (weight.detach(), bias.detach()) if not keep_gated else (weight.requires_grad_(), bias.requires_grad_())
        args = (x.requires_grad_(), attn.requires_grad_(), u.requires_grad_(), *frozen, seed, 0.3, 1e-6, projection,
                keep_gated)
        torch.library.opcheck(ops.attention_output_fwd.default, args)
        _, gated = ops.attention_output_fwd(*args)
        torch.library.opcheck(ops.attention_output_bwd.default,
                              (torch.randn(9, 25, device=DEVICE), attn.detach(), u.detach(), weight.detach(),
                               gated.detach(), seed, 0.3, 1e-6, keep_gated))
    w_in = torch.randn(25, 40, generator=g).to(DEVICE).requires_grad_()
    for keep_pre, normalization in ((False, "prologue"), (True, "kernel")):
        torch.library.opcheck(ops.attention_input_fwd.default, (x, w_in, 1e-6, keep_pre, normalization))
        _, mean, rstd, pre, normed = ops.attention_input_fwd(x.detach(), w_in.detach(), 1e-6, keep_pre, normalization)
        torch.library.opcheck(ops.attention_input_bwd.default,
                              (torch.randn(9, 40, device=DEVICE), x.detach(), w_in.detach(), mean, rstd, pre, normed,
                               keep_pre, normalization, True))
    torch.library.opcheck(ops.attention_gate_fwd.default, (attn, u, seed, 0.3, 1e-6))
    torch.library.opcheck(ops.attention_gate_bwd.default,
                          (torch.randn(9, 50, device=DEVICE), attn.detach(), u.detach(), seed, 0.3, 1e-6))


@needs_triton
def test_triton_eager_path_equals_custom_op():
    """Eager calls skip the custom ops' dispatch; outputs and every gradient are bitwise the ops'."""
    module = triton_module()
    p = OutputProblem(rows=17, dim=25, width=50, dropout_p=0.3, seed=10)
    seed = torch.tensor(p.seed, device=DEVICE)
    results = []
    for call in (module._output, lambda *args: torch.ops.hstu_kernels.attention_output_fwd(*args)):
        x, attn, u, weight, bias, leaves = output_inputs(p, p.dtype)
        out, _ = call(x, attn, u, weight, bias, seed, p.dropout_p, 1e-6, "fused", True)
        results.append((out, *torch.autograd.grad(out.square().sum(), list(leaves.values()))))
    for name, a, b in zip(["out", "x", "attn", "u", "weight", "bias"], *results):
        assert torch.equal(a, b), f"{name}: eager path and custom op differ"


@needs_triton
def test_triton_fused_projection_stores_gated_rows_only_for_a_weight_gradient():
    """The gated rows serve the weight gradient alone. Without grad mode, or with W and b frozen, the
    fused forward stores none; the output and the gradients of x, attn and u are bitwise those of the
    call that stores them."""
    module = triton_module()
    p = OutputProblem(rows=21, dim=25, width=50, dropout_p=0.3, seed=15)
    seed = torch.tensor(p.seed, device=DEVICE)
    x, attn, u, weight, bias, _ = output_inputs(p, p.dtype)
    args = (x, attn, u, weight, bias, seed, p.dropout_p, 1e-6, "fused")
    stored, kept = module._output(*args, True)
    assert kept.shape == (21, module._padded_width(50))
    with torch.no_grad():
        inferred = module.attention_output_with(x, attn, u, weight, bias, dropout_p=p.dropout_p, training=True,
                                                seed=p.seed, projection="fused")
        assert module._output(*args, False)[1].shape == (0, module._padded_width(50))
    assert torch.equal(inferred, stored.detach())
    grads = torch.autograd.grad(stored.square().sum(), [x, attn, u])
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    frozen = module.attention_output_with(x, attn, u, weight, bias, dropout_p=p.dropout_p, training=True,
                                          seed=p.seed, projection="fused")
    for name, a, b in zip(["x", "attn", "u"], grads, torch.autograd.grad(frozen.square().sum(), [x, attn, u])):
        assert torch.equal(a, b), f"grad_{name}: frozen projection differs"


@needs_triton
@pytest.mark.parametrize("autocast", [False, True])
def test_triton_compiled_forward_backward_matches_eager(autocast):
    """torch.compile(fullgraph=True) of one STU block's two sides on the Triton backend: one graph (the
    autocast queries and the seed draw included), the same numbers as eager."""
    g = torch.Generator().manual_seed(11)
    dtype = torch.float16 if autocast else torch.float32
    x = torch.randn(13, 25, generator=g).to(DEVICE).requires_grad_()
    w_in = (torch.randn(25, 100, generator=g) * 0.2).to(DEVICE).requires_grad_()
    w_out = (torch.randn(25, 50, generator=g) * 0.2).to(DEVICE).requires_grad_()
    bias = torch.randn(25, generator=g).to(DEVICE).requires_grad_()
    seed = torch.tensor(12, device=DEVICE)

    def block(x, w_in, w_out, bias):
        with autocast_to(dtype, autocast):
            uvqk = hstu_kernels.attention_input(x, w_in, eps=1e-6, backend="triton")
            u, attn = uvqk[:, :50], uvqk[:, 50:]
            return hstu_kernels.attention_output(x, attn, u, w_out, bias, dropout_p=0.2, training=True, seed=seed,
                                                 backend="triton")

    leaves = [x, w_in, w_out, bias]
    eager = block(*leaves)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(*leaves)
    assert compiled.dtype == eager.dtype == torch.float32
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for name, a, b in zip(["x", "w_in", "w_out", "bias"], torch.autograd.grad(eager.square().sum(), leaves),
                          torch.autograd.grad(compiled.square().sum(), leaves)):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m: f"grad_{name}: {m}")


@needs_triton
def test_triton_rejects_unknown_choices_and_names_interpreter_bf16():
    module = triton_module()
    x, attn = torch.zeros(2, 3, device=DEVICE), torch.zeros(2, 4, device=DEVICE)
    with pytest.raises(ValueError, match="projection must be one of"):
        module.attention_output_with(x, attn, attn, torch.zeros(3, 4, device=DEVICE), None, dropout_p=0.0,
                                     training=False, projection="tensor-cores")
    wide = torch.zeros(2, module.FUSED_OUTPUT_WIDTH_LIMIT + 1, device=DEVICE)
    with pytest.raises(ValueError, match="fused projection takes"):
        module.attention_output_with(x, wide, wide, torch.zeros(3, wide.shape[1], device=DEVICE), None,
                                     dropout_p=0.0, training=False, projection="fused")
    with pytest.raises(ValueError, match="prologue normalisation takes"):
        module.attention_input_with(torch.zeros(2, module.PROLOGUE_INPUT_DIM_LIMIT + 1, device=DEVICE),
                                    torch.zeros(module.PROLOGUE_INPUT_DIM_LIMIT + 1, 6, device=DEVICE),
                                    normalization="prologue")
    with pytest.raises(ValueError, match="normalization must be one of"):
        module.attention_input_with(x, torch.zeros(3, 6, device=DEVICE), normalization="epilogue")
    if module.KERNELS_INTERPRETED:
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            module.attention_input(x, torch.zeros(3, 6))


@needs_triton
def test_unsupported_reason_looks_at_dtypes_and_the_normalised_width():
    module = triton_module()
    x, attn = torch.zeros(2, 3), torch.zeros(2, 4)
    assert module.unsupported_reason((x, torch.zeros(3, 6))) is None
    assert module.unsupported_reason((x, attn, attn, torch.zeros(3, 4))) is None
    assert "dtype" in module.unsupported_reason((x.double(), torch.zeros(3, 6)))
    wide = torch.zeros(2, module.MAX_WIDTH + 1)
    assert "width" in module.unsupported_reason((x, wide, wide, torch.zeros(3, module.MAX_WIDTH + 1)))
    assert "width" in module.unsupported_reason((torch.zeros(2, 0), torch.zeros(0, 6)))


@needs_triton
def test_output_projection_rule_fuses_up_to_the_limit_on_both_widths():
    """The fused projection holds W [D, H*dv] as one tile: it is picked only where both widths fit."""
    module = triton_module()
    limit = module.FUSED_OUTPUT_MAX_WIDTH
    assert limit <= module.FUSED_OUTPUT_WIDTH_LIMIT
    assert module.output_projection(50, 50) == module.output_projection(limit, limit) == "fused"
    assert module.output_projection(limit + 1, 50) == module.output_projection(50, limit + 1) == "cublas"
    assert module.output_projection(256, 256) == "cublas"


@needs_triton
def test_row_alignment_divides_the_width_and_every_stride():
    """The row kernels' ALIGN: a wrong one would make the kernels misread rows (and misalign vector loads
    on a GPU), so every value it is taken from must be a multiple of it."""
    from hstu_kernels.triton.common import row_alignment

    assert row_alignment(50, 50, 200, 56) == 2  # the model's gate at width 50: attn, a slice of uvqk, gated rows
    assert row_alignment(64, 64, 256, 72) == 8
    assert row_alignment(256, 1024) == 16
    assert row_alignment(7, 7) == 1
    assert row_alignment(48, 0) == 16  # a zero stride (one row, or a broadcast) constrains nothing
    for values in [(50, 100), (12, 36, 20), (3,), (96, 40, 8)]:
        align = row_alignment(*values)
        assert all(v % align == 0 for v in values) and any(v % (2 * align) for v in values)


@pytest.mark.parametrize("variant", ["", "output", "output-fused", "output-cublas", "gate", "gate-padded", "input",
                                     "input-stored", "input-recompute", "input-prologue", "input-kernel"])
def test_bench_variants_agree_with_the_reference_at_a_tiny_shape(variant):
    """Each benchmark variant's Triton call gives the reference's output (same seeded mask); its eager
    form (torch's dropout) has the same shape and dtype."""
    import argparse

    spec = hstu_kernels.REGISTRY[OP]
    options = argparse.Namespace(seed=0, call="api", validate=True, variant=variant)
    case = spec.bench.build((9, 25, 16), torch.float16 if not HAS_CUDA else torch.bfloat16, DEVICE, options)
    ref = case.call("reference")
    eager = case.eager_call()
    assert eager.shape == ref.shape and eager.dtype == ref.dtype
    if TritonOperatorManager.availability(OP)[0]:
        got = case.call("triton")
        assert got.dtype == ref.dtype
        torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)
    with pytest.raises(SystemExit, match="--variant"):
        spec.bench.build((9, 25, 16), torch.float16, DEVICE, argparse.Namespace(seed=0, call="api", variant="nope"))


@needs_triton
def test_bench_backward_times_the_gates_aligned_gradients_as_made(monkeypatch):
    """The harness's fwd+bwd of ``gate-padded`` at width 50 returns the gate's gradients in aligned rows and
    accumulates nothing into ``.grad``: a copy of them into the inputs' layout would be timed otherwise."""
    import argparse

    from cli import load_script

    bench = load_script("bench_kernels", monkeypatch)
    options = argparse.Namespace(seed=0, call="api-unchecked", validate=False, variant="gate-padded")
    case = hstu_kernels.REGISTRY[OP].bench.build((37, 50, 50), torch.float16, DEVICE, options)
    grads = bench.timed_function(lambda: case.call("triton"), "fwd+bwd", case.leaves)()
    assert [g.stride() for g in grads] == [(aligned_width(50), 1)] * 2
    assert all(t.grad is None for t in case.leaves)


# --------------------------------------------------------------------------------------------- GPU
# Full sizes under bf16 autocast as the model runs (x, W, b in fp32; attn and u in bf16), the model's
# non-power-of-2 widths, both projections and both pre-activation choices; CUDA graphs; inductor.
GPU_OUTPUT_SHAPES = [(200_000, 50, 50), (25_600, 50, 50), (25_600, 64, 64), (8_192, 256, 256), (8_192, 512, 512),
                     (4_099, 25, 100), (2_048, 128, 1024)]
GPU_INPUT_SHAPES = [(25_600, 50, 200), (25_600, 64, 256), (8_192, 256, 1024), (8_192, 512, 2048), (4_099, 25, 100)]


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("shape", GPU_OUTPUT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("projection", ["fused", "cublas"])
def test_gpu_output_bf16_autocast_full_size(shape, projection):
    rows, dim, width = shape
    if projection == "fused" and max(dim, width) > triton_module().FUSED_OUTPUT_WIDTH_LIMIT:
        pytest.skip("the fused projection takes D and H*dv <= FUSED_OUTPUT_WIDTH_LIMIT")
    check_output_against_reference(OutputProblem(rows=rows, dim=dim, width=width, dtype=torch.bfloat16,
                                                 dropout_p=0.2, projection=projection, model_layout=True,
                                                 autocast=True, seed=rows + width))


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_output_without_autocast(dtype):
    check_output_against_reference(OutputProblem(rows=8_192, dim=64, width=50, dtype=dtype, dropout_p=0.1, seed=2))


@pytest.mark.gpu
@needs_triton
def test_gpu_output_cublas_without_fp32_addmm_input(monkeypatch):
    """Where this torch's addmm cannot add an fp32 input to a bf16 product, the cuBLAS projection adds
    the residual after the matmul: the same results within the rule."""
    monkeypatch.setattr(triton_module(), "_addmm_takes_fp32_input", lambda device, dtype: False)
    check_output_against_reference(OutputProblem(rows=8_192, dim=256, width=256, dtype=torch.bfloat16,
                                                 dropout_p=0.2, projection="cublas", autocast=True, seed=3))


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("shape", GPU_INPUT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("keep_pre", [False, True])
def test_gpu_input_bf16_autocast_full_size(shape, keep_pre):
    rows, dim, cols = shape
    check_input_against_reference(InputProblem(rows=rows, dim=dim, cols=cols, dtype=torch.bfloat16, keep_pre=keep_pre,
                                               normalization=triton_module().input_normalization(dim),
                                               autocast=True, offset=3.0, seed=rows + cols))


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("normalization", ["prologue", "kernel"])
def test_gpu_input_without_autocast(dtype, normalization):
    check_input_against_reference(InputProblem(rows=8_192, dim=50, cols=200, dtype=dtype, normalization=normalization,
                                               seed=5))


def stu_sides(x, w_in, w_out, bias, seed, dropout_p=0.2):
    """The STU block's two sides around an identity attention: x -> [u, attn] -> output (bf16 autocast)."""
    width = w_out.shape[1]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        uvqk = hstu_kernels.attention_input(x, w_in, eps=1e-6, backend="triton")
        u, attn = uvqk[:, :width], uvqk[:, width:2 * width]
        return hstu_kernels.attention_output(x, attn, u, w_out, bias, dropout_p=dropout_p, training=True, seed=seed,
                                             backend="triton")


def stu_leaves(rows=4_099, dim=50, width=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, dim, generator=g)).cuda().requires_grad_(),
            (torch.randn(dim, 4 * width, generator=g) * 0.1).cuda().requires_grad_(),
            (torch.randn(dim, width, generator=g) * 0.1).cuda().requires_grad_(),
            torch.randn(dim, generator=g).cuda().requires_grad_()]


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("width", [50, 512])  # the fused projection, and cuBLAS
def test_gpu_cuda_graph_replays_match_eager_and_draw_new_masks(width):
    """Forward and backward of both sides captured in one CUDA graph. Replayed with new inputs copied in:
    the same output and gradients as eager with the same (static) seed; with the seed drawn inside the
    graph, two replays give different dropout masks."""
    static = stu_leaves(width=width)
    seed = torch.tensor(5, device="cuda")
    grad_out = torch.randn(static[0].shape, device="cuda")

    def step(drawn: bool):
        out = stu_sides(*static, None if drawn else seed)
        return (out, *torch.autograd.grad(out, static, grad_out))

    for drawn in (False, True):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step(drawn)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step(drawn)
        fresh = stu_leaves(width=width, seed=1)
        with torch.no_grad():
            for target, value in zip(static, fresh):
                target.copy_(value)
        graph.replay()
        first = [t.clone() for t in captured]
        if not drawn:
            out = stu_sides(*fresh, seed)
            expected = (out, *torch.autograd.grad(out, fresh, grad_out))
            for name, got, want in zip(["out", "x", "w_in", "w_out", "bias"], first, expected):
                torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        else:
            graph.replay()
            assert not torch.equal(first[0], captured[0]), "two replays drew the same dropout mask"


@pytest.mark.gpu
@needs_triton
def test_gpu_inductor_compiled_sides_match_eager():
    leaves = stu_leaves(width=64, dim=64)
    seed = torch.tensor(7, device="cuda")
    eager = stu_sides(*leaves, seed)
    compiled = torch.compile(stu_sides, fullgraph=True)(*leaves, seed)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for name, a, b in zip(["x", "w_in", "w_out", "bias"], torch.autograd.grad(eager.sum(), leaves),
                          torch.autograd.grad(compiled.sum(), leaves)):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m: f"grad_{name}: {m}")


@pytest.mark.gpu
@needs_triton
def test_gpu_bitwise_repeatable_at_full_size():
    """No atomics: two runs of both sides give the same bits."""
    leaves = stu_leaves(rows=25_600, dim=256, width=256)
    seed = torch.tensor(9, device="cuda")
    runs = []
    for _ in range(2):
        out = stu_sides(*leaves, seed)
        runs.append((out, *torch.autograd.grad(out.square().sum(), leaves)))
    for name, a, b in zip(["out", "x", "w_in", "w_out", "bias"], *runs):
        assert torch.equal(a, b), f"{name} differs between two runs"
