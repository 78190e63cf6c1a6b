"""The seeded dropout shared by the operators: Philox bit-exact with Triton's tl.rand, statistics, errors."""
import pytest
import torch

from hstu_kernels.dropout import draw_seed, dropout, philox_uniform, seeded_dropout_mask

f64 = torch.float64


def test_philox_uniform_matches_triton_rand(device):
    """The seeded mask is defined as Triton's tl.rand(seed, index) >= p: check it bit for bit."""
    triton = pytest.importorskip("triton")
    tl = pytest.importorskip("triton.language")

    @triton.jit
    def store_rand(out_ptr, seed, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offsets, tl.rand(seed, offsets), mask=offsets < n)

    n = 3000
    for seed in (0, 7, 2**33 + 5, 2**63 - 1):
        from_triton = torch.empty(n, dtype=torch.float32, device=device)
        store_rand[(triton.cdiv(n, 1024),)](from_triton, seed, n, BLOCK=1024)
        assert torch.equal(philox_uniform(seed, n, device), from_triton), f"seed {seed}"


def test_philox_custom_op_registration():
    """philox_uniform is an opaque custom op for torch.compile: its fake (meta) kernel must agree with it."""
    torch.library.opcheck(torch.ops.hstu_kernels.philox_uniform.default, (torch.tensor(5), 100, torch.device("cpu")))


def test_philox_uniform_is_uniform_and_seed_dependent():
    u = philox_uniform(3, 200_000)
    assert u.dtype == torch.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005
    assert abs(float((u < 0.2).float().mean()) - 0.2) < 0.005
    assert not torch.equal(u[:1000], philox_uniform(4, 1000))
    assert torch.equal(u[:1000], philox_uniform(3, 1000))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_seeded_dropout_scales_kept_and_zeroes_dropped(p):
    x = torch.rand(64, 50, dtype=f64) + 1.0
    out = dropout(x, p, training=True, seed=11)
    keep = seeded_dropout_mask(x.shape, p, 11)
    torch.testing.assert_close(out, torch.where(keep, x / (1 - p), torch.zeros_like(x)))
    assert abs(float(keep.float().mean()) - (1 - p)) < 0.03


def test_dropout_identity_cases_and_unseeded_statistics():
    x = torch.rand(100, 100) + 1.0
    assert dropout(x, 0.5, training=False, seed=None) is x
    assert dropout(x, 0.0, training=True, seed=3) is x
    assert torch.equal(dropout(x, 1.0, training=True, seed=3), torch.zeros_like(x))
    out = dropout(x, 0.3, training=True, seed=None)
    kept = out != 0
    assert abs(float(kept.float().mean()) - 0.7) < 0.03
    torch.testing.assert_close(out[kept], x[kept] / 0.7)


def test_dropout_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dropout_p must be in"):
        dropout(torch.ones(3), 1.5, training=True, seed=None)
    with pytest.raises(ValueError, match="seed must be in"):
        dropout(torch.ones(3), 0.5, training=True, seed=-1)




def test_tensor_seed_gives_the_int_seed_mask_and_draw_seed_varies():
    """Training passes int64 device tensors (CUDA-graph safe); they must define the same mask as ints."""
    for seed in (0, 12345, 2**40 + 3):
        assert torch.equal(philox_uniform(torch.tensor(seed), 500), philox_uniform(seed, 500))
    torch.manual_seed(0)
    seeds = {int(draw_seed("cpu")) for _ in range(20)}
    assert len(seeds) == 20 and all(0 <= s < 2**62 for s in seeds)
    with pytest.raises(ValueError, match="one int64 value"):
        dropout(torch.ones(3), 0.5, training=True, seed=torch.tensor([1, 2]))


def test_seeded_dropout_traces_with_a_tensor_seed_without_graph_breaks():
    """A tensor seed flows through torch.compile without a host read (fullgraph) or a recompile per seed."""
    compiled = torch.compile(lambda x, s: dropout(x, 0.5, True, s), backend="eager", fullgraph=True)
    x = torch.ones(64)
    for seed in (1, 2):
        torch.testing.assert_close(compiled(x, torch.tensor(seed)), dropout(x, 0.5, True, seed))
