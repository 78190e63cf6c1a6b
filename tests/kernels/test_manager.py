"""TritonOperatorManager: flags, availability reasons, fallback policy, stats."""
import logging

import pytest
import torch

import hstu_kernels
from hstu_kernels import OPERATORS, TritonOperatorManager, TritonUnavailableError
from hstu_kernels.manager import TRITON_MODULES


def test_unknown_flag_is_named():
    with pytest.raises(KeyError, match="hstu_attn"):
        TritonOperatorManager({"hstu_attn": True})


def test_bad_fallback_policy():
    with pytest.raises(ValueError, match="kernel_fallback"):
        TritonOperatorManager({}, fallback="ignore")


def test_flags_off_use_reference_and_count():
    m = TritonOperatorManager({})
    x = torch.randn(3)
    assert all(m.backend(op, (x,)) == "reference" for op in OPERATORS)
    assert all(s["reference_calls"] == 1 and s["requested"] == "reference" for s in m.stats().values())
    assert m.fallbacks() == {}


@pytest.mark.parametrize("op", [op for op in OPERATORS if TRITON_MODULES[op] is None])
def test_unwritten_operator_reports_not_implemented(op):
    ok, reason = TritonOperatorManager.availability(op)
    assert not ok and reason == "not implemented yet"


def test_warn_fallback_logs_once_and_records(caplog):
    op = next(op for op in OPERATORS if TRITON_MODULES[op] is None)
    m = TritonOperatorManager({op: True}, fallback="warn")
    x = torch.randn(3)
    with caplog.at_level(logging.WARNING, logger="hstu_kernels.manager"):
        assert m.backend(op, (x,)) == "reference"
        assert m.backend(op, (x,)) == "reference"
    assert sum(op in r.getMessage() for r in caplog.records) == 1
    assert m.fallbacks() == {op: "not implemented yet"}
    assert m.stats()[op]["reference_calls"] == 2 and m.stats()[op]["requested"] == "triton"
    assert "FALLBACK" in m.report()


def test_error_fallback_raises():
    op = next(op for op in OPERATORS if TRITON_MODULES[op] is None)
    m = TritonOperatorManager({op: True}, fallback="error")
    with pytest.raises(TritonUnavailableError, match="not implemented yet"):
        m.backend(op, (torch.randn(3),))


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the static check passes")
    ok, reason = TritonOperatorManager.availability("hstu_hierarchical_attention")
    assert not ok and "TRITON_INTERPRET" in reason


def test_forced_backend_validation():
    with pytest.raises(ValueError, match="backend must be"):
        hstu_kernels.topk_items(torch.randn(2, 4), torch.randn(5, 4), 2, backend="cuda")
    with pytest.raises(TritonUnavailableError):
        hstu_kernels.topk_items(torch.randn(2, 4), torch.randn(5, 4), 2, backend="triton")
