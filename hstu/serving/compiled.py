"""A compiled scoring package (torch.export + AOTInductor, ``.pt2``) that runs without this repository.

The package holds the whole-window scoring path of an export: histories in, the top ``k`` item
indices and cosine scores out, with the export's weights inside. It is built from plain torch ops
(every operator on its PyTorch reference, a one-pass top-k instead of the chunked one, with
ties to the smaller item id as there), so
``torch._inductor.aoti_load_package(path)`` is all a user needs. The batch is dynamic (1 and up),
and so are the numbers of tokens and seen events.

A package is native code: loading it (``aoti_load_package``, the serving engine's whole-window path)
runs the shared library inside it, so load only packages, and serve only export folders, you trust.

A package is tied to its target: device, CPU architecture (and the vector ISA Inductor compiled
for), GPU architecture and torch version. Each is built for the machine it is compiled on, named
``scoring-<target>.pt2``, and described in the export's config.json under ``compiled``:

Inputs (all int64): item_ids [L] and timestamps [L] (each history's max_seq_len most recent
events, model item indices 1..num_items, oldest first, histories concatenated), seq_offsets [B+1],
request_times [B] (Unix seconds; the query time of each last position), seen_ids [S] (items to
exclude, e.g. every event of each history) and seen_offsets [B+1]. Outputs: scores float32 [B, k]
and item indices int64 [B, k] (0: no item left); index i is items.json's ``original_ids[i - 1]``.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hstu.errors import PackageLoadError
from hstu.checkpoints import load_state_strictly
from hstu.files import sha256_of
from hstu.inference import (
    CONFIG_FILE, WEIGHTS_FILE, build_model, check_export_files, check_recorded_digest, load_weights,
    read_export_config, weights_mismatch,
)
from hstu.model.recommender import SequentialRecommender
from hstu_kernels.jagged import last_index, sequence_index
from hstu_kernels.normalize import l2_normalize
from hstu_kernels.reference.topk import top_k_smaller_ids_first

INPUT_NAMES = ("item_ids", "timestamps", "seq_offsets", "request_times", "seen_ids", "seen_offsets")
OUTPUT_NAMES = ("scores", "item_ids")
DEFAULT_K = 100


class ScoringProgram(nn.Module):
    """History in, top-k out, for a SequentialRecommender whose operators all run their references."""

    def __init__(self, model: SequentialRecommender, k: int):
        super().__init__()
        requested = {op: entry["requested"] for op, entry in model.manager.get_stats().items()}
        if any(backend != "reference" for backend in requested.values()):
            raise ValueError(f"ScoringProgram needs every operator on its reference (plain torch ops); got {requested}")
        self.model = model.eval()
        self.k = min(k, model.num_items)

    def forward(self, item_ids, timestamps, seq_offsets, request_times, seen_ids, seen_offsets):
        model = self.model
        x = model.embedding(item_ids, timestamps, seq_offsets)
        x = model.encoder(x, seq_offsets, timestamps, request_times)
        queries = l2_normalize(F.normalize(x, dim=-1, eps=1e-6)[last_index(seq_offsets)].float())
        scores = queries @ l2_normalize(model.item_table[1:].float()).T  # [B, num_items]
        seen_owner = sequence_index(seen_offsets, seen_ids.shape[0])
        scores = scores.index_put((seen_owner, seen_ids - 1), torch.tensor(float("-inf"), device=scores.device))
        top_scores, top_index = top_k_smaller_ids_first(scores, self.k)
        return top_scores, torch.where(top_scores == float("-inf"), 0, top_index + 1)


def target_name(device: torch.device) -> dict[str, str]:
    """What a package is tied to, as strings: device, CPU architecture and vector ISA, GPU architecture, torch."""
    from torch._inductor import cpu_vec_isa

    target = {"device": device.type, "cpu_arch": platform.machine(), "cpu_isa": str(cpu_vec_isa.pick_vec_isa()) or "none",
              "torch": torch.__version__}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        target["gpu_arch"] = f"sm_{major}{minor}"
    return target


def package_file_name(target: dict[str, str]) -> str:
    parts = [target["device"], target.get("gpu_arch"), target["cpu_arch"], target["cpu_isa"], "torch" + target["torch"]]
    return "scoring-" + "-".join(p for p in parts if p).replace("+", "_").replace(" ", "_") + ".pt2"


def reference_model(export_dir: str | Path) -> tuple[SequentialRecommender, dict[str, Any]]:
    """The export's model with every operator on its reference, in eval mode and without gradients (Inductor's
    CUDA build runs the program with out= matmuls, which refuse parameters that require grad), and its config.json."""
    export_dir = Path(export_dir)
    config = read_export_config(export_dir)
    model = build_model(export_dir, config, kernels=None, kernel_fallback="warn")
    load_state_strictly(model, load_weights(export_dir / WEIGHTS_FILE), weights_mismatch(export_dir))
    check_export_files(export_dir, config)
    return model.eval().requires_grad_(False), config


def example_inputs(model: SequentialRecommender, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Two histories (7 and 2 events) with 9 seen events: sizes that are neither 0 nor 1 nor equal, so
    that torch.export keeps every dimension symbolic."""
    lengths = [min(7, model.max_seq_len), min(2, model.max_seq_len)]
    tokens = sum(lengths)
    item_ids = torch.arange(tokens, dtype=torch.int64) % model.num_items + 1
    timestamps = 1_600_000_000 + 60 * torch.arange(tokens, dtype=torch.int64)
    seq_offsets = torch.tensor([0, lengths[0], tokens], dtype=torch.int64)
    request_times = timestamps[seq_offsets[1:] - 1] + 60
    seen_ids = torch.arange(tokens + 2, dtype=torch.int64) % model.num_items + 1
    seen_offsets = torch.tensor([0, lengths[0] + 2, tokens + 2], dtype=torch.int64)
    return tuple(t.to(device) for t in (item_ids, timestamps, seq_offsets, request_times, seen_ids, seen_offsets))


def export_scoring_program(model: SequentialRecommender, k: int, device: torch.device):
    """torch.export of :class:`ScoringProgram` with dynamic batch (>= 1), token and seen-event counts."""
    program = ScoringProgram(model.to(device), k)
    batch = torch.export.Dim("batch", min=1)
    tokens = torch.export.Dim("tokens", min=1)
    seen = torch.export.Dim("seen", min=1)
    shapes = {"item_ids": {0: tokens}, "timestamps": {0: tokens}, "seq_offsets": {0: batch + 1},
              "request_times": {0: batch}, "seen_ids": {0: seen}, "seen_offsets": {0: batch + 1}}
    with torch.no_grad():
        return torch.export.export(program, example_inputs(model, device), dynamic_shapes=shapes)


def compile_export(export_dir: str | Path, device: str | torch.device = "cpu", k: int = DEFAULT_K) -> Path:
    """Build the scoring package of ``export_dir`` for this machine's ``device`` and record it in config.json.

    The package is written to a temporary file and moved into place, then config.json is replaced
    the same way: a failed build leaves the export folder as it was.
    """
    from torch._inductor import aoti_compile_and_package

    export_dir, device = Path(export_dir), torch.device(device)
    model, config = reference_model(export_dir)
    target = target_name(device)
    name = package_file_name(target)
    exported = export_scoring_program(model, k, device)
    handle, staging = tempfile.mkstemp(dir=export_dir, prefix=f".{name}.tmp-", suffix=".pt2")
    os.close(handle)
    try:
        # Compile-time autotuning runs each kernel on synthetic inputs, whose random indices trip
        # Inductor's bounds asserts on CUDA (pytorch/pytorch#192143); kernels then use their heuristic configs.
        aoti_compile_and_package(exported, package_path=staging,
                                 inductor_configs={"triton.autotune_at_compile_time": False})
        check_package_runs(Path(staging), name, example_inputs(model, device), device)
        os.chmod(staging, 0o644)
        os.replace(staging, export_dir / name)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    entry = {**target, "k": min(k, model.num_items), "dtype": "float32", "inputs": list(INPUT_NAMES),
             "outputs": list(OUTPUT_NAMES), "batch": "dynamic, >= 1", "sha256": sha256_of(export_dir / name)}
    config.setdefault("compiled", {})[name] = entry
    _replace_json(export_dir / CONFIG_FILE, config)
    return export_dir / name


# Run in a fresh interpreter with plain torch: load the package, score the inputs, report the output shapes.
_LOAD_AND_RUN = """
import sys, torch
from torch._inductor import aoti_load_package
inputs = [t.to(sys.argv[3]) for t in torch.load(sys.argv[2], weights_only=True)]
scores, items = aoti_load_package(sys.argv[1])(*inputs)
print(tuple(scores.shape), tuple(items.shape))
"""


def check_package_runs(package: Path, name: str, inputs: tuple[torch.Tensor, ...], device: torch.device,
                       timeout: float = 600.0) -> None:
    """Load ``package`` (to be written as ``name``) in a fresh Python process and score ``inputs`` there;
    raise PackageLoadError with its exit status and last output line if that fails. A package that
    crashes its loader (a segmentation fault kills the process, so no caller could catch it) is never
    recorded in an export."""
    with tempfile.TemporaryDirectory() as scratch:
        inputs_file = Path(scratch) / "inputs.pt"
        torch.save([t.cpu() for t in inputs], inputs_file)
        try:
            result = subprocess.run([sys.executable, "-c", _LOAD_AND_RUN, str(package), str(inputs_file), device.type],
                                    capture_output=True, text=True, timeout=timeout, cwd=scratch)
        except subprocess.TimeoutExpired:
            raise PackageLoadError(f"{name}: loading and running it in a fresh process took over "
                                   f"{timeout:.0f} s; it was not written", None) from None
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise PackageLoadError(f"{name}: the package does not load and run in a fresh process "
                               f"(exit status {result.returncode}: {last}); it was not written", result.returncode)


def _replace_json(path: Path, content: dict) -> None:
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(handle, "w") as f:
            json.dump(content, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(staging, 0o644)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def matching_package(export_dir: str | Path, config: dict[str, Any], device: torch.device) -> Path | None:
    """The export's package built for exactly this target, if there is one; ExportFormatError if its file
    is not the one config.json records (the weights baked into it would not be the export's)."""
    name = package_file_name(target_name(device))
    path = Path(export_dir) / name
    if name not in config.get("compiled", {}) or not path.is_file():
        return None
    _check_package(path, config)
    return path


def check_packages(export_dir: str | Path, config: dict[str, Any]) -> None:
    """Every package config.json records and the folder holds is the file recorded (no device is touched:
    a server checks them before its workers start)."""
    for name in config.get("compiled", {}):
        if (Path(export_dir) / name).is_file():
            _check_package(Path(export_dir) / name, config)


def _check_package(path: Path, config: dict[str, Any]) -> None:
    check_recorded_digest(path, config["compiled"][path.name].get("sha256"), f"compiled.{path.name}.sha256",
                          "build it again with scripts/export.py, or serve without it (compiled=false)")
