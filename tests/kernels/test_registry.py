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
