"""TritonOperatorManager: flags, availability reasons, fallback policy, the function it hands back, and
what it counts as a call in eager code, inside torch.compile and inside a captured region."""
import dataclasses
import importlib
import logging
import subprocess
import sys

import pytest
import torch

import hstu_kernels
from hstu_kernels import OPERATORS, REGISTRY, TritonOperatorManager, TritonUnavailableError
from hstu_kernels.manager import resolve_function

ATTENTION = "hstu_hierarchical_attention"


def attention_inputs(heads=1, dim=4, tokens=5):
    q = torch.randn(tokens, heads, dim)
    return q, q.clone(), q.clone(), torch.tensor([0, 2, tokens])


def test_unknown_flag_is_named():
    with pytest.raises(KeyError, match="hstu_attn"):
        TritonOperatorManager({"hstu_attn": True})


def test_an_unknown_operator_or_function_is_named():
    manager, tensors = TritonOperatorManager(), attention_inputs()
    for call in (manager.backend, manager.choice, lambda op, t: manager.implementation(op, "hstu_attention", t)):
        with pytest.raises(KeyError, match=r"unknown operator 'hstu_attn'; valid: \['hstu_hierarchical_attention'"):
            call("hstu_attn", tensors)
    with pytest.raises(KeyError, match=rf"operator '{ATTENTION}' has no function 'topk_items'; it has \["):
        manager.implementation(ATTENTION, "topk_items", tensors)
    assert manager.get_stats()[ATTENTION]["calls"] == {"triton": 0, "reference": 0}  # no call was made


def test_a_flag_that_is_not_a_bool_is_named():
    with pytest.raises(TypeError, match=r"True or False; got \{'interaction': 'no'\}"):
        TritonOperatorManager({"interaction": "no"})


def test_a_first_call_with_the_default_backend_may_be_inside_torch_compile():
    """The default manager is built on import: a trace that meets it first only reads it."""
    code = ("import torch, hstu_kernels\n"
            "f = torch.compile(lambda q, t: hstu_kernels.topk_items(q, t, 2), fullgraph=True, backend='eager')\n"
            "print(f(torch.randn(3, 4), torch.randn(5, 4))[1].shape)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "torch.Size([3, 2])", done.stderr[-3000:]


def test_bad_fallback_policy():
    with pytest.raises(ValueError, match="kernel_fallback"):
        TritonOperatorManager({}, fallback="ignore")


def test_flags_off_hand_back_the_reference_and_count():
    m = TritonOperatorManager({})
    x = torch.randn(3)
    assert all(a["chosen"] is None for a in m.get_operator_availability().values())  # none called yet
    for op, spec in REGISTRY.items():
        for function in spec.functions:
            assert m.implementation(op, function, (x,)) is resolve_function(op, function, "reference")
    stats = m.get_stats()
    assert all(s["calls"]["reference"] == len(REGISTRY[op].functions) and s["requested"] == "reference"
               for op, s in stats.items())
    assert all(a["chosen"] == "reference" for a in m.get_operator_availability().values())
    assert m.fallbacks() == {}


@pytest.fixture
def unwritten(monkeypatch):
    """The attention operator as if its Triton module did not exist yet."""
    monkeypatch.setitem(REGISTRY, ATTENTION, dataclasses.replace(REGISTRY[ATTENTION], triton=False))
    return ATTENTION


def test_unwritten_operator_reports_not_implemented(unwritten):
    ok, reason = TritonOperatorManager.availability(unwritten)
    assert not ok and reason == "not implemented yet"
    availability = TritonOperatorManager({unwritten: True}).get_operator_availability()[unwritten]
    assert availability["requested"] == "triton" and not availability["available"]
    assert availability["reason"] == "not implemented yet"


def test_warn_fallback_logs_once_and_records(unwritten, caplog):
    m = TritonOperatorManager({unwritten: True}, fallback="warn")
    x = torch.randn(3)
    with caplog.at_level(logging.WARNING, logger="hstu_kernels.manager"):
        assert m.backend(unwritten, (x,)) == "reference"
        assert m.backend(unwritten, (x,)) == "reference"
    assert sum(unwritten in r.getMessage() for r in caplog.records) == 1
    assert m.fallbacks() == {unwritten: "not implemented yet"}
    stats = m.get_stats()[unwritten]
    assert stats["calls"]["reference"] == 2 and stats["requested"] == "triton"
    assert stats["fallback_reason"] == "not implemented yet"
    assert m.get_operator_availability()[unwritten]["chosen"] == "reference"
    assert "FALLBACK" in m.report()


def test_error_fallback_raises(unwritten):
    m = TritonOperatorManager({unwritten: True}, fallback="error")
    with pytest.raises(TritonUnavailableError, match="not implemented yet"):
        m.backend(unwritten, (torch.randn(3),))


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the static check passes")
    ok, reason = TritonOperatorManager.availability(ATTENTION)
    assert not ok and "TRITON_INTERPRET" in reason


def test_decisions_key_on_the_trailing_dims_the_kernel_checks(monkeypatch):
    """A head dim the kernel refuses must not reuse the decision made for a supported one."""
    m = TritonOperatorManager({ATTENTION: True})
    module = m._modules[ATTENTION]
    monkeypatch.setattr(module, "MAX_HEAD_DIM", 8)
    assert m.backend(ATTENTION, attention_inputs(dim=8)[:3]) == "triton"
    assert m.backend(ATTENTION, attention_inputs(dim=16)[:3]) == "reference"
    assert "head dim 16 > 8" in m.fallbacks()[ATTENTION]


def test_choice_is_the_backend_decision_without_counting_a_call(monkeypatch):
    m = TritonOperatorManager({ATTENTION: True})
    monkeypatch.setattr(m._modules[ATTENTION], "MAX_HEAD_DIM", 8)
    supported, refused = attention_inputs(dim=8)[:3], attention_inputs(dim=16)[:3]
    assert m.choice(ATTENTION, supported) == "triton" and m.choice(ATTENTION, refused) == "reference"
    assert TritonOperatorManager({}).choice(ATTENTION, supported) == "reference"
    assert sum(m.get_stats()[ATTENTION]["calls"].values()) == 0
    assert m.backend(ATTENTION, supported) == "triton" and m.backend(ATTENTION, refused) == "reference"
    assert dict(m.get_stats()[ATTENTION]["calls"]) == {"triton": 1, "reference": 1}


def test_forced_backend_validation(unwritten):
    with pytest.raises(ValueError, match="backend must be"):
        hstu_kernels.topk_items(torch.randn(2, 4), torch.randn(5, 4), 2, backend="cuda")
    with pytest.raises(TritonUnavailableError, match="not implemented yet"):
        hstu_kernels.manager.implementation(unwritten, REGISTRY[unwritten].functions[0], "triton", (torch.randn(2, 4),))


def test_forced_triton_refuses_inside_torch_compile_what_it_refuses_eagerly(monkeypatch):
    """backend="triton" on inputs its kernel cannot take (a head dim over its limit) raises under torch.compile
    too: the kernel would run and return wrong values."""
    monkeypatch.setattr(importlib.import_module(REGISTRY[ATTENTION].triton_module), "MAX_HEAD_DIM", 8)
    q, k, v, offsets = attention_inputs(dim=16)[:4]

    def attend(q, k, v):
        return hstu_kernels.hstu_attention(q, k, v, offsets, 16, 0.1, backend="triton")

    for call in (attend, torch.compile(attend, backend="eager")):
        with pytest.raises(TritonUnavailableError, match="head dim 16 > 8"):
            call(q, k, v)
    torch._dynamo.reset()  # the frame the graph break marked to run eagerly
    with pytest.raises(torch._dynamo.exc.Unsupported, match="head dim 16 > 8"):  # fullgraph: no eager rerun to raise it
        torch.compile(attend, backend="eager", fullgraph=True)(q, k, v)


def test_calls_traced_by_torch_compile_are_counted_per_region_execution():
    """Under torch.compile no Python runs after the trace: a region adds its traced calls per execution,
    and calls traced outside any region are reported apart, never as executions."""
    m = TritonOperatorManager({})
    q, k, v, offsets = attention_inputs()

    def two_calls(q):
        out = hstu_kernels.hstu_attention(q, k, v, offsets, 5, 1.0, backend=m, validate=False)
        return hstu_kernels.hstu_attention(out, k, v, offsets, 5, 1.0, backend=m, validate=False)

    compiled = torch.compile(two_calls, backend="eager", fullgraph=True, dynamic=False)
    for _ in range(3):
        with m.region("step"):
            compiled(q)
    assert m.get_stats()[ATTENTION]["calls"]["reference"] == 6
    with m.region("step"):  # eager: each dispatch counts once, the template is not added on top
        two_calls(q)
    assert m.get_stats()[ATTENTION]["calls"]["reference"] == 8
    loose = torch.compile(lambda q: two_calls(q) + 1, backend="eager", fullgraph=True, dynamic=False)
    loose(q)
    loose(q)
    stats = m.get_stats()[ATTENTION]
    assert stats["calls"]["reference"] == 8 and stats["traced"] == {"reference": 2}


@pytest.mark.parametrize("head_limit", [8, 2], ids=["triton", "fallback"])
def test_compiled_calls_decide_at_trace_time_and_never_recompile(monkeypatch, caplog, head_limit):
    """A trace decides the backend without reading the manager's caches: a guard on them would be broken by
    their first write and recompile the graph on its second call, inside a CUDA-graph capture a failure."""
    m = TritonOperatorManager({ATTENTION: True}, fallback="warn")
    monkeypatch.setattr(m._modules[ATTENTION], "MAX_HEAD_DIM", head_limit)
    q, k, v, offsets = attention_inputs(dim=4)
    compiled = torch.compile(lambda q: hstu_kernels.hstu_attention(q, k, v, offsets, 5, 1.0, backend=m, validate=False),
                             backend="eager", fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True), caplog.at_level(logging.WARNING):
        for _ in range(3):
            with m.region("step"):
                compiled(q)
    expected = "triton" if head_limit == 8 else "reference"
    assert m.get_stats()[ATTENTION]["calls"][expected] == 3
    assert m.get_operator_availability()[ATTENTION]["chosen"] == expected
    if expected == "reference":
        assert "head dim 4 > 2" in m.fallbacks()[ATTENTION]
        assert sum("falling back" in r.getMessage() for r in caplog.records) == 1
    torch._dynamo.reset()


def test_a_capture_only_region_records_and_replays_add():
    """A region that only captures (executes=False) records the calls per replay without counting them."""
    m = TritonOperatorManager({})
    with m.region("graph", executes=False):
        m._record_traced(ATTENTION, "reference")  # what a dispatch does during a CUDA-graph capture
    assert m.get_stats()[ATTENTION]["calls"]["reference"] == 0
    for _ in range(4):
        with m.region("graph"):
            pass  # graph.replay(): no Python dispatch
    assert m.get_stats()[ATTENTION]["calls"]["reference"] == 4


def test_timing_off_never_touches_the_clock_and_on_reports_times():
    q, k, v, offsets = attention_inputs()
    plain = TritonOperatorManager({})
    assert plain.implementation(ATTENTION, "hstu_attention", (q, k, v)) is resolve_function(
        ATTENTION, "hstu_attention", "reference")
    assert "timing_ms" not in plain.get_stats()[ATTENTION]
    timed = TritonOperatorManager({}, timing=True)
    for _ in range(3):
        hstu_kernels.hstu_attention(q, k, v, offsets, 5, 1.0, backend=timed)
    timing = timed.get_stats()[ATTENTION]["timing_ms"]
    assert timing["count"] == 3 and timing["total"] > 0
    assert timed.get_stats()["interaction"]["timing_ms"] is None


def test_every_operator_is_listed_in_availability_and_stats():
    m = TritonOperatorManager({op: True for op in OPERATORS})
    assert list(m.get_operator_availability()) == list(OPERATORS) == list(m.get_stats())
