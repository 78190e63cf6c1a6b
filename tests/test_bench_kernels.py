"""scripts/bench_kernels.py refuses bad options with one line naming the option, before timing or writing anything;
its timed backward computes the case's gradients or refuses to time."""
import csv
import dataclasses

import pytest
import torch
from cli import load_script

from hstu_kernels.benchmarking import ProviderUnavailable
from hstu_kernels.manager import TritonUnavailableError

ATTENTION = "hstu_hierarchical_attention"
TINY = ["--dtype", "fp32", "--mode", "fwd", "--providers", "reference", "--rep", "2", "--warmup", "1"]


@pytest.fixture
def bench(monkeypatch):
    return load_script("bench_kernels", monkeypatch)


def refused(bench, args, csv_path) -> str:
    """The message bench_kernels exits with; nothing may have been written to ``csv_path``."""
    with pytest.raises(SystemExit) as exit_:
        bench.main(args + ["--csv", str(csv_path)])
    assert not csv_path.exists()
    return str(exit_.value.code)


@pytest.mark.parametrize("shape, message", [
    ("2,16,1,1b", r"--shapes '2,16,1,1b': d must be an integer >= 1, got '1b'"),
    ("2,16,x,16", r"--shapes '2,16,x,16': H must be an integer >= 1, got 'x'"),
    ("0,16,1,16", r"--shapes '0,16,1,16': B must be an integer >= 1, got '0'"),
    ("2,-16,1,16", r"--shapes '2,-16,1,16': N must be an integer >= 1, got '-16'"),
])
def test_a_shape_field_that_is_not_a_positive_integer_is_refused(bench, tmp_path, shape, message):
    assert refused(bench, ["--op", ATTENTION, "--shapes", shape, *TINY], tmp_path / "bench.csv") == message


def test_a_field_that_the_ops_target_shapes_set_to_0_takes_0(bench, tmp_path):
    """The full softmax's shapes have R = 0 (M x D x R x I)."""
    csv_path = tmp_path / "bench.csv"
    bench.main(["--op", "sequence_recommendation_interaction", "--variant", "full", "--shapes", "4,8,0,16", *TINY,
                "--csv", str(csv_path)])
    header, row = csv_path.read_text().splitlines()
    row = dict(zip(header.split(","), row.split(",")))
    assert row["shape"] == "4x8x0x16" and row["variant"] == "full" and float(row["ms"]) > 0


@pytest.mark.parametrize("providers, message", [
    ("reference,trition", "--providers 'reference,trition': unknown ['trition']; valid: "
                          "triton, reference, eager, compiled, peer, copy"),
    (",", "--providers ',': no provider named; valid: triton, reference, eager, compiled, peer, copy"),
])
def test_an_unknown_provider_is_refused_before_any_row_is_written(bench, tmp_path, providers, message):
    args = ["--op", ATTENTION, "--shapes", "2,16,1,16", *TINY, "--providers", providers]
    assert refused(bench, args, tmp_path / "bench.csv") == message


def test_a_variant_is_refused_by_an_op_that_takes_none(bench, tmp_path):
    args = ["--op", ATTENTION, "--shapes", "2,16,1,16", *TINY, "--variant", "rows"]
    assert refused(bench, args, tmp_path / "bench.csv") == f"--variant 'rows': {ATTENTION} takes no --variant"


def test_an_op_with_variants_refuses_one_it_does_not_have(bench, tmp_path):
    args = ["--op", "interaction", "--shapes", "4,8,32,4", *TINY, "--variant", "row"]
    assert refused(bench, args, tmp_path / "bench.csv") == "--variant 'row': interaction takes '' or one of stream, rows"


def test_a_csv_path_that_cannot_be_written_is_refused_before_timing(bench, tmp_path):
    (tmp_path / "file").write_text("")
    args = ["--op", ATTENTION, "--shapes", "2,16,1,16", *TINY]
    assert refused(bench, args, tmp_path / "file" / "bench.csv") == \
        f"--csv {tmp_path}/file/bench.csv: {tmp_path}/file is not an existing folder"
    assert refused(bench, args, tmp_path / "missing" / "bench.csv") == \
        f"--csv {tmp_path}/missing/bench.csv: {tmp_path}/missing is not an existing folder"
    with pytest.raises(SystemExit, match=f"^--csv {tmp_path}: is a folder, not a file$"):
        bench.main(args + ["--csv", str(tmp_path)])


def test_a_csv_of_other_contents_is_not_appended_to(bench, tmp_path):
    """Rows go only to a new file or to a CSV of this script's rows: a run's metrics.json stays whole."""
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"test": {}}')
    args = ["--op", ATTENTION, "--shapes", "2,16,1,16", *TINY, "--csv", str(metrics)]
    with pytest.raises(SystemExit, match=rf"^--csv {metrics}: not a CSV of this script's rows \(its first line is "
                                         r"not the header date,op,provider,\.\.\.\); name a new file$"):
        bench.main(args)
    assert metrics.read_text() == '{"test": {}}'
    csv_path = tmp_path / "bench.csv"
    bench.main(["--op", ATTENTION, "--shapes", "2,16,1,16", *TINY, "--csv", str(csv_path)])
    bench.main(["--op", ATTENTION, "--shapes", "2,16,1,16", *TINY, "--csv", str(csv_path)])  # appended to
    assert len(csv_path.read_text().splitlines()) == 3


def test_direct_calls_are_refused_by_an_op_without_them(bench, tmp_path):
    args = ["--op", "interaction", "--shapes", "4,8,32,4", *TINY, "--call", "direct"]
    assert refused(bench, args, tmp_path / "bench.csv") == \
        "--call direct: interaction has no direct call (its backend function alone); use --call api-unchecked"


def test_modes_that_leave_nothing_to_time_are_refused(bench, tmp_path):
    """--mode keeps the op's modes among those named (topk has fwd only); none left is refused."""
    args = ["--op", "interaction", "--shapes", "4,8,32,4", *TINY, "--mode", "bwd,fwd+bwd"]
    assert refused(bench, args, tmp_path / "bench.csv") == "--mode 'bwd,fwd+bwd': interaction times only fwd"


@pytest.mark.parametrize("mode", ["bwd", "fwd+bwd"])
def test_a_backward_that_reaches_no_input_of_the_case_is_not_timed(bench, mode):
    """A provider whose output hangs off other tensors than the case's inputs would time an empty backward:
    refused with the reason; one that reaches them returns their gradients and writes no ``.grad``."""
    inputs, stranger = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    with pytest.raises(bench.ProviderUnavailable, match="reaches none of the case's inputs"):
        bench.timed_function(lambda: stranger * 2, mode, [inputs])
    timed = bench.timed_function(lambda: inputs * 2 + stranger, mode, [inputs])
    (grad,), _ = timed(), timed()  # bwd: the retained graph runs again
    assert grad.shape == (3,) and inputs.grad is None


@pytest.mark.parametrize("extra", [["--kernel-breakdown", "3"], ["--kernel-breakdown", "-1", "--kernel-time"]])
def test_a_kernel_breakdown_needs_kernel_time_and_a_positive_count(bench, tmp_path, extra):
    args = ["--op", ATTENTION, "--shapes", "2,16,1,16", *TINY, *extra]
    assert refused(bench, args, tmp_path / "bench.csv") == \
        f"--kernel-breakdown {extra[1]}: give N >= 1 together with --kernel-time"


def test_the_kernel_breakdown_lists_the_longest_kernels_and_sums_the_rest(bench, capsys):
    shares = [bench.KernelShare("gemm", 0.030, 2), bench.KernelShare("layer_norm", 0.015, 1),
              bench.KernelShare("cast", 0.004, 3), bench.KernelShare("fill", 0.001, 1)]
    result = bench.Result("triton", "fwd+bwd", 0.09, kernel_ms=0.05, kernels=shares)
    bench.print_kernel_breakdown([("8x16", {}, [result, bench.Result("eager", "fwd+bwd", 0.2)])], top=2)
    assert capsys.readouterr().out.splitlines() == [
        "",
        "8x16 fwd+bwd triton: 0.0500 ms in 7 launches a call",
        "       30.0 us  60.0% x2  gemm",
        "       15.0 us  30.0% x1  layer_norm",
        "        5.0 us in 2 other kernels",
    ]


def test_the_compiled_provider_compiles_every_case_past_dynamos_recompile_limit(bench, monkeypatch):
    """Cases share their eager function; past dynamo's recompile limit a compiled call would run eagerly
    and the 'compiled' column would time eager."""
    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend=counting_backend,
                                                                            dynamic=kwargs["dynamic"]))
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)

    def eager_form(x):
        return lambda: (x * 2).sum()

    for n in (3, 5, 7):
        case = type("Case", (), {"eager_call": staticmethod(eager_form(torch.ones(n)))})()
        assert bench.provider_forward(None, case, "compiled", "default")().item() == 2 * n
    assert len(graphs) == 3


@pytest.mark.parametrize("provider, error, exits", [
    ("triton", RuntimeError("kernel broke"), True),
    ("triton", torch.OutOfMemoryError("out of memory"), True),
    ("triton", ProviderUnavailable("no Triton backend here"), False),
    ("triton", TritonUnavailableError("cannot run here"), False),
    ("eager", RuntimeError("baseline broke"), True),
    ("eager", torch.OutOfMemoryError("out of memory"), False),
])
def test_a_provider_that_raises_fails_the_run_after_its_rows_are_written(bench, tmp_path, monkeypatch, provider,
                                                                         error, exits):
    """The table and the CSV keep the reason; the exit status says that a provider broke (ours running out of
    memory included), not that it is unavailable on this machine or that a baseline ran out of memory."""
    build_case = bench.build_case

    def raise_error(*args):
        raise error

    def case_whose_provider_raises(*args, **kwargs):
        case = build_case(*args, **kwargs)
        if provider == "eager":
            return dataclasses.replace(case, eager_call=raise_error)

        def call(backend):
            return raise_error() if backend == "triton" else case.call(backend)
        return dataclasses.replace(case, call=call)

    monkeypatch.setattr(bench, "build_case", case_whose_provider_raises)
    csv_path = tmp_path / "bench.csv"
    args = ["--op", "interaction", "--shapes", "4,8,32,4", *TINY, "--providers", f"{provider},reference",
            "--csv", str(csv_path)]
    if exits:
        with pytest.raises(SystemExit, match=rf"^bench_kernels.py: interaction: 1 row\(s\) failed; first {provider} "
                                             rf"at 4x8x32x4 fwd: (\w+: )?{error}$"):
            bench.main(args)
    else:
        bench.main(args)
    rows = list(csv.DictReader(csv_path.open()))
    assert [row["provider"] for row in rows] == ["reference", provider]
    assert str(error) in rows[1]["note"] and float(rows[0]["ms"]) > 0
