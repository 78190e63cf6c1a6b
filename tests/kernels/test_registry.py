"""The registry is the single source of truth: every operator has its flag, its config file, its
reference, its Triton module (where declared), its tests and a benchmark case that builds."""
import argparse
import importlib
import importlib.util
import inspect
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml

import hstu_kernels
from cli import load_script
from hstu_kernels import OPERATORS, REGISTRY
from hstu_kernels.manager import TritonOperatorManager

REPO = Path(__file__).resolve().parents[2]
TRITON_CONF = REPO / "conf" / "triton"


def test_operator_keys_are_the_five_flag_keys():
    assert OPERATORS == ("hstu_hierarchical_attention", "fused_attention_layernorm", "hierarchical_sequence_fusion",
                         "sequence_recommendation_interaction", "interaction")


def test_kernel_flags_schema_is_derived_from_the_registry():
    from hstu.config import KernelFlags

    assert [(f.name, f.type, f.default) for f in fields(KernelFlags)] == [(op, bool, False) for op in OPERATORS]


def test_conf_triton_has_one_file_per_operator_plus_all_and_none():
    assert {p.stem for p in TRITON_CONF.glob("*.yaml")} == set(OPERATORS) | {"all", "none"}
    for op in OPERATORS:
        text = (TRITON_CONF / f"{op}.yaml").read_text()
        assert text.startswith("# @package model.kernels") and yaml.safe_load(text) == {op: True}
    assert yaml.safe_load((TRITON_CONF / "all.yaml").read_text()) == {op: True for op in OPERATORS}
    assert yaml.safe_load((TRITON_CONF / "none.yaml").read_text()) == {op: False for op in OPERATORS}


@pytest.mark.parametrize("op", OPERATORS)
def test_each_function_has_a_public_entry_a_reference_and_its_triton_twin(op):
    spec = REGISTRY[op]
    reference = importlib.import_module(spec.reference_module)
    triton = importlib.import_module(spec.triton_module) if spec.triton else None
    assert spec.triton == (importlib.util.find_spec(spec.triton_module) is not None)
    for name in spec.functions:
        public = getattr(hstu_kernels, name)
        assert public.__module__ == f"hstu_kernels.ops.{spec.module}"
        public_params = inspect.signature(public).parameters
        assert {"backend", "validate"} <= set(public_params)
        implementations = [getattr(reference, name)] + ([getattr(triton, name)] if triton else [])
        for impl in implementations:  # the same arguments as the public function, less dispatch options
            expected = [p for p in public_params if p not in ("backend", "validate")]
            assert list(inspect.signature(impl).parameters)[:len(expected)] == expected, impl
    if triton is not None:
        assert callable(triton.unsupported_reason)


TRITON_FILES = sorted(p.stem for p in (REPO / "kernels" / "triton").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", TRITON_FILES)
def test_module_constants_survive_inductors_copy_of_the_kernels(name):
    """Inductor copies a kernel's module-level ``tl.constexpr`` globals into its generated code as
    ``tl.constexpr(<repr>)``; a value whose repr is no Python literal (``-inf``) breaks ``torch.compile``
    and AOTInductor there, so each one must read back equal from that line."""
    triton_language = pytest.importorskip("triton.language")
    module = importlib.import_module(f"hstu_kernels.triton.{name}")
    for constant, value in vars(module).items():
        if isinstance(value, triton_language.constexpr):
            line = f"tl.constexpr({value.value!r})"
            assert eval(line, {"tl": triton_language}).value == value.value, f"{name}.{constant}: {line}"


@pytest.mark.parametrize("op", OPERATORS)
def test_each_operator_has_its_test_file(op):
    assert (REPO / REGISTRY[op].test_file).is_file()


@pytest.mark.parametrize("op", OPERATORS)
def test_each_bench_case_builds_at_a_tiny_shape(op):
    bench = REGISTRY[op].bench
    shape = tuple(max(2, min(s, 8)) for s in bench.default_shapes[0])
    options = argparse.Namespace(seed=0, bias="both", call="api", validate=True)
    case = bench.build(shape, torch.float32, torch.device("cpu"), options)
    out = case.call("reference")
    assert torch.is_tensor(out) and set(case.work) >= set(bench.modes)


@pytest.mark.parametrize("op", OPERATORS)
def test_bench_harness_runs_every_operator_and_writes_csv_rows(op, tmp_path, monkeypatch):
    bench = load_script("bench_kernels", monkeypatch)
    assert bench.OPERATORS is REGISTRY
    shape = ",".join(str(max(2, min(s, 8))) for s in REGISTRY[op].bench.default_shapes[0])
    mode = "fwd+bwd" if "fwd+bwd" in REGISTRY[op].bench.modes else "fwd"
    csv_path = tmp_path / "bench.csv"
    bench.main(["--op", op, "--shapes", shape, "--providers", "reference", "--mode", mode, "--bias", "both",
                "--dtype", "fp32", "--csv", str(csv_path), "--rep", "5", "--warmup", "1", "--backward-thread", "caller"])
    assert torch.autograd.is_multithreading_enabled(), "the harness left autograd's threading changed"
    lines = csv_path.read_text().splitlines()
    row = dict(zip(lines[0].split(","), lines[1].split(",")))
    assert len(lines) == 2 and row["op"] == op and row["provider"] == "reference" and row["mode"] == mode
    assert row["backward_thread"] == "caller" and float(row["ms"]) > 0 and float(row["rate"]) > 0


@pytest.mark.parametrize("op", [op for op in OPERATORS if "fwd+bwd" in REGISTRY[op].bench.modes])
def test_a_backward_with_create_graph_through_a_triton_operator_raises(op):
    """The Triton backwards build no graph, so a second backward would get zeros from them wherever another
    term (here a zero-weighted square of the inputs) kept the first backward's graph alive: refused."""
    available, why = TritonOperatorManager.availability(op)
    if not available:
        pytest.skip(why)
    shape = tuple(max(2, min(s, 8)) for s in REGISTRY[op].bench.default_shapes[0])
    options = argparse.Namespace(seed=0, bias="both", call="api", validate=True)
    case = REGISTRY[op].bench.build(shape, torch.float32, torch.device("cpu"), options)
    leaves = case.leaves
    loss = case.call("triton").float().square().sum() + 0.0 * sum(leaf.sum() ** 2 for leaf in leaves)
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        torch.autograd.grad(loss, leaves, create_graph=True)
    assert all(g is not None for g in torch.autograd.grad(loss, leaves))  # a plain backward still runs


def _bad_argument_calls():
    """(call taking a backend, error type, message) per plain argument of the public functions."""
    q, offsets, ts = torch.randn(4, 1, 2), torch.tensor([0, 4]), torch.arange(4)
    ids, table, tables = torch.tensor([0, 1, 2]), torch.randn(3, 4), [torch.randn(2, 4)]
    states, pos = torch.randn(2, 4), torch.tensor([0, 1])
    x = torch.randn(2, 4)

    def fusion(backend, scale=1.0, time_scales=((1, 2),), dropout_p=0.0, item_table=table):
        return hstu_kernels.sequence_fusion(ids, ts[:3], torch.tensor([0, 3]), item_table, table, tables, scale=scale,
                                            time_scales=time_scales, dropout_p=dropout_p, training=True, backend=backend)

    return {
        "max_seq_len float": (lambda b: hstu_kernels.hstu_attention(q, q, q, offsets, 4.0, 0.5, backend=b), TypeError,
                              "hstu_attention: max_seq_len must be an int, got 4.0"),
        "alpha None": (lambda b: hstu_kernels.hstu_attention(q, q, q, offsets, 4, None, backend=b), TypeError,
                       "hstu_attention: alpha must be a real number, got None"),
        "alpha nan": (lambda b: hstu_kernels.hstu_attention(q, q, q, offsets, 4, float("nan"), backend=b), ValueError,
                      "hstu_attention: alpha must be finite, got nan"),
        "time_weight too long": (lambda b: hstu_kernels.hstu_attention(
            q, q, q, offsets, 4, 0.5, q_timestamps=ts, k_timestamps=ts, time_weight=torch.randn(1000), backend=b),
            ValueError, r"hstu_attention: time_weight has 1000 buckets; at most 146"),
        "max_new_len float": (lambda b: hstu_kernels.hstu_attention_delta(
            q, q, q, offsets, q[:0], q[:0], torch.tensor([0, 0]), 8, 0.5, max_new_len=4.0, backend=b), TypeError,
            "hstu_attention_delta: max_new_len must be an int, got 4.0"),
        "scale None": (lambda b: fusion(b, scale=None), TypeError, "sequence_fusion: scale must be a real number"),
        "time scale float": (lambda b: fusion(b, time_scales=((1.5, 2),)), TypeError,
                             r"sequence_fusion: time_scales\[0\] must be a pair of ints \(width, buckets\), got \(1.5, 2\)"),
        "time scales a string": (lambda b: fusion(b, time_scales="ab"), TypeError,
                                 r"sequence_fusion: time_scales\[0\] must be a pair of ints"),
        "fusion dropout None": (lambda b: fusion(b, dropout_p=None), TypeError,
                                "sequence_fusion: dropout_p must be a real number, got None"),
        "integer item table": (lambda b: fusion(b, item_table=ids[:, None].expand(3, 4)), TypeError,
                               "sequence_fusion: item_table must be a floating-point tensor, got torch.int64"),
        "temperature None": (lambda b: hstu_kernels.full_softmax_loss(states, pos, table, temperature=None, backend=b),
                             TypeError, "full_softmax_loss: temperature must be a real number, got None"),
        "integer states": (lambda b: hstu_kernels.sampled_softmax_loss(
            pos[:, None].expand(2, 4), pos, pos, table, temperature=0.1, backend=b), TypeError,
            "sampled_softmax_loss: states must be a floating-point tensor, got torch.int64"),
        "integer input": (lambda b: hstu_kernels.attention_input(x.long(), table.T.long(), backend=b), TypeError,
                          "attention_input: x must be a floating-point tensor, got torch.int64"),
        "eps None": (lambda b: hstu_kernels.attention_output(x, x, x, table.T @ table, None, dropout_p=0.1,
                                                             training=True, eps=None, backend=b),
                     TypeError, "attention_output: eps must be a real number, got None"),
        "output dropout True": (lambda b: hstu_kernels.attention_output(x, x, x, table.T @ table, None, dropout_p=True,
                                                                        training=True, backend=b),
                                TypeError, "attention_output: dropout_p must be a real number, got True"),
        # Flags given as strings would count as true ("no" included).
        "output training 'no'": (lambda b: hstu_kernels.attention_output(x, x, x, table.T @ table, None, dropout_p=0.1,
                                                                         training="no", backend=b),
                                 TypeError, "attention_output: training must be a bool, got 'no'"),
        "fusion position_from_end 1": (lambda b: hstu_kernels.sequence_fusion(
            ids, ts[:3], torch.tensor([0, 3]), table, table, tables, scale=1.0, time_scales=((1, 2),), dropout_p=0.0,
            training=True, position_from_end=1, backend=b),
            TypeError, "sequence_fusion: position_from_end must be a bool, got 1"),
        "loss l2_norm 'false'": (lambda b: hstu_kernels.full_softmax_loss(states, pos, table, temperature=0.1,
                                                                          l2_norm="false", backend=b),
                                 TypeError, "full_softmax_loss: l2_norm must be a bool, got 'false'"),
        "topk l2_norm None": (lambda b: hstu_kernels.topk_items(states, table, 2, l2_norm=None, backend=b),
                              TypeError, "topk_items: l2_norm must be a bool, got None"),
        "attention validate 'no'": (lambda b: hstu_kernels.hstu_attention(q, q, q, offsets, 4, 0.5, validate="no",
                                                                          backend=b),
                                    TypeError, "hstu_attention: validate must be a bool, got 'no'"),
        # Tensors on two devices (meta stands in for a GPU here) would fail deep inside a backend.
        "offsets on another device": (lambda b: hstu_kernels.hstu_attention(q, q, q, offsets.to("meta"), 4, 0.5,
                                                                            backend=b), ValueError,
                                      "hstu_attention: seq_offsets is on meta but q on cpu; all tensor arguments "
                                      "must be on one device"),
        "time table on another device": (lambda b: hstu_kernels.sequence_fusion(
            ids, ts[:3], torch.tensor([0, 3]), table, table, [tables[0].to("meta")], scale=1.0, time_scales=((1, 2),),
            dropout_p=0.0, training=True, backend=b), ValueError,
            r"sequence_fusion: time_tables\[0\] is on meta but item_ids on cpu"),
        "exclusions on another device": (lambda b: hstu_kernels.topk_items(
            states, table, 2, exclude_ids=pos.to("meta"), exclude_offsets=torch.tensor([0, 1, 2]), backend=b),
            ValueError, "topk_items: exclude_ids is on meta but queries on cpu"),
        "bias on another device": (lambda b: hstu_kernels.attention_output(
            x, x, x, table.T @ table, x[0].to("meta"), dropout_p=0.1, training=True, backend=b), ValueError,
            "attention_output: bias is on meta but x on cpu"),
    }


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", list(_bad_argument_calls()))
def test_plain_arguments_get_one_message_naming_them_on_every_backend(case, backend):
    """Counts, scales, probabilities, flags, dtypes and devices are checked in the dispatch layer: the same error
    on every backend, where a backend would fail deep inside in its own way, or run on a value it misreads."""
    if backend == "triton" and not TritonOperatorManager.availability("interaction")[0]:
        pytest.skip(TritonOperatorManager.availability("interaction")[1])
    call, error, message = _bad_argument_calls()[case]
    with pytest.raises(error, match=f"^{message}"):
        call(backend)


def _checked_calls():
    """A call per public function whose ``validate`` reads device values, on small CPU inputs."""
    states, table, pos = torch.randn(4, 6), torch.randn(5, 6), torch.tensor([0, 1, 2, 3])
    offsets, q = torch.tensor([0, 2, 5]), torch.randn(5, 1, 4)
    layout = hstu_kernels.hstu_attention_layout(offsets, 4, 5)
    return {
        "topk_items": lambda: hstu_kernels.topk_items(states, table, 2, target_ids=pos),
        "full_softmax_loss": lambda: hstu_kernels.full_softmax_loss(states, pos, table, temperature=0.1),
        "sampled_softmax_loss": lambda: hstu_kernels.sampled_softmax_loss(states, pos, pos[:2], table, temperature=0.1),
        "hstu_attention": lambda: hstu_kernels.hstu_attention(q, q, q, offsets, 4, 0.5),
        "hstu_attention(layout=)": lambda: hstu_kernels.hstu_attention(q, q, q, offsets.clone(), 4, 0.5, layout=layout),
        "hstu_attention_delta": lambda: hstu_kernels.hstu_attention_delta(
            q, q, q, offsets, q[:3], q[:3], torch.tensor([0, 1, 3]), 8, 0.5),
    }


@pytest.mark.parametrize("name", list(_checked_calls()))
def test_checked_calls_trace_whole_their_value_checks_skipped(name):
    """validate=True (the default) inside torch.compile: the checks that read device values are skipped
    in the trace, as for every function, instead of breaking the graph on a data-dependent guard."""
    call = _checked_calls()[name]
    torch._dynamo.reset()
    compiled = torch.compile(lambda: call(), fullgraph=True, backend="eager")
    for got, want in zip(torch.utils._pytree.tree_leaves(compiled()), torch.utils._pytree.tree_leaves(call())):
        assert torch.equal(got, want)
