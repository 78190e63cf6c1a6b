"""The jagged index helpers (hstu_kernels.jagged) against a loop over sequences, also when
``searchsorted`` reads sliced boundaries as Inductor's GPU lowering in torch 2.11 does
(tests/searchsorted_views.py); on the GPU, the helpers compiled by Inductor against eager."""
import pytest
import torch
from cases import offsets_of
from searchsorted_views import SearchsortedDroppingViewOffsets

from hstu_kernels import jagged

LENGTHS = [[0], [1], [3], [0, 0], [2, 0, 3], [0, 4, 0, 1, 1], [5, 5], [7, 0]]
MAX_LEN = 7


def helpers(offsets: torch.Tensor, num_tokens: int) -> dict[str, torch.Tensor]:
    """Every helper's output on these offsets (values 10 * t, the last slots 1000 + b)."""
    values = torch.arange(num_tokens, device=offsets.device) * 10
    last_values = torch.arange(offsets.numel() - 1, device=offsets.device) + 1000
    position, last = jagged.token_positions(offsets, num_tokens)
    from_end, _ = jagged.token_positions(offsets, num_tokens, from_end=True)
    return {
        "sequence": jagged.sequence_index(offsets, num_tokens), "position": position, "last": last,
        "from_end": from_end, "padded_row": jagged.padded_rows(offsets, num_tokens, MAX_LEN),
        "next": jagged.next_in_sequence(values, offsets, last_values),
    }


def helpers_by_loop(lengths) -> dict[str, torch.Tensor]:
    out = {name: [] for name in ("sequence", "position", "last", "from_end", "padded_row", "next")}
    start = 0
    for b, length in enumerate(lengths):
        for p in range(length):
            t = start + p
            for name, value in (("sequence", b), ("position", p), ("last", start + length - 1),
                                ("from_end", length - 1 - p), ("padded_row", b * MAX_LEN + p),
                                ("next", 1000 + b if p == length - 1 else 10 * (t + 1))):
                out[name].append(value)
        start += length
    return {name: torch.tensor(values, dtype=torch.int64) for name, values in out.items()}


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_helpers_match_a_loop_over_sequences(lengths, dtype):
    got = helpers(offsets_of(lengths).to(dtype), sum(lengths))
    for name, expected in helpers_by_loop(lengths).items():
        assert torch.equal(got[name], expected), name


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_helpers_do_not_search_a_sliced_view(lengths):
    """A search over ``offsets[1:]`` put every token one sequence too far (its positions negative,
    its sequence's end one past the offsets) wherever Inductor compiled it for the GPU."""
    offsets = offsets_of(lengths)
    expected = helpers(offsets, sum(lengths))
    with SearchsortedDroppingViewOffsets() as mode:
        emulated = helpers(offsets, sum(lengths))
    for name in expected:
        assert torch.equal(emulated[name], expected[name]), name
    assert mode.shifted == 0


def test_emulation_reads_a_slice_from_its_buffer_start():
    """The emulation itself: searchsorted(offsets[1:]) becomes searchsorted(offsets[:-1])."""
    offsets, token = torch.tensor([0, 3, 7, 12]), torch.arange(12)
    with SearchsortedDroppingViewOffsets() as mode:
        shifted = torch.searchsorted(offsets[1:], token, right=True)
        whole = torch.searchsorted(offsets, token, right=True)
    assert mode.shifted == 1
    assert torch.equal(shifted, torch.searchsorted(offsets[:-1], token, right=True))
    assert torch.equal(shifted, torch.searchsorted(offsets[1:], token, right=True) + 1)
    assert torch.equal(whole, torch.searchsorted(offsets, token, right=True))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_check_offsets_names_each_fault(dtype):
    """Start, end, order (also where the differences wrap around the integer type) and the longest length."""
    top = torch.iinfo(dtype).max
    for offsets, message in (([1, 3, 5], "must start at 0 and end at L=5"), ([0, 3, 4], "must start at 0 and end"),
                             ([0, 3, 2, 5], "must be non-decreasing"), ([0, top, -2, 5], "must be non-decreasing"),
                             ([0, 5, 5], "a sequence of length 5 exceeds max_seq_len=4")):
        with pytest.raises(ValueError, match=f"^op: seq_offsets {message}|^op: {message}"):
            jagged.check_offsets(torch.tensor(offsets, dtype=dtype), 5, 4, "op")
    jagged.check_offsets(torch.tensor([0, 0, 4, 5], dtype=dtype), 5, 4, "op")
    jagged.check_offsets(torch.tensor([0], dtype=dtype), 0, 4, "op")


# ---------------------------------------------------------------------------------------------
# GPU: Inductor's Triton searchsorted
# ---------------------------------------------------------------------------------------------
def gpu_offsets() -> torch.Tensor:
    from hstu_kernels.benchmarking import seeded
    from hstu_kernels.ops.sequence_fusion import jagged_lengths_totalling

    lengths = jagged_lengths_totalling(seeded(0), 25_600, 200).tolist() + [0, 1]
    return offsets_of(lengths).cuda()


@pytest.mark.gpu
def test_gpu_inductor_reads_sliced_boundaries_as_emulated_or_as_eager():
    """Inductor on this torch searches ``offsets[1:]`` either right (a torch with the upstream fix)
    or from the buffer's start (torch 2.11): the CPU emulation above covers what the GPU does."""
    offsets = torch.tensor([0, 3, 7, 12], device="cuda")
    token = torch.arange(12, device="cuda")
    torch._dynamo.reset()
    compiled = torch.compile(lambda o, t: torch.searchsorted(o[1:], t, right=True), dynamic=False)(offsets, token)
    eager = torch.searchsorted(offsets[1:], token, right=True)
    with SearchsortedDroppingViewOffsets():
        emulated = torch.searchsorted(offsets[1:], token, right=True)
    assert torch.equal(compiled, eager) or torch.equal(compiled, emulated), compiled.tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("dynamic", [False, True])
def test_gpu_inductor_sequence_index_matches_eager(dynamic):
    """Indices only, no indexing with them: a wrong search fails here by value, not by a device assert."""
    offsets = gpu_offsets()
    num_tokens = int(offsets[-1])
    torch._dynamo.reset()
    compiled = torch.compile(jagged.sequence_index, dynamic=dynamic)(offsets, num_tokens)
    assert torch.equal(compiled, jagged.sequence_index(offsets, num_tokens))


@pytest.mark.gpu
@pytest.mark.parametrize("dynamic", [False, True])
def test_gpu_inductor_helpers_match_eager(dynamic):
    offsets = gpu_offsets()
    num_tokens = int(offsets[-1])
    torch._dynamo.reset()
    compiled = torch.compile(helpers, dynamic=dynamic)(offsets, num_tokens)
    torch.cuda.synchronize()
    expected = helpers(offsets, num_tokens)
    for name in expected:
        assert torch.equal(compiled[name], expected[name]), name
