"""Fit, select, test, report: what ``scripts/train.py`` runs, from a composed Hydra config."""
from __future__ import annotations

import json
import logging
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from hstu.callbacks import EpochThroughput

log = logging.getLogger(__name__)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _instantiate_all(section: DictConfig | None) -> list[Any]:
    return [instantiate(node) for node in (section or {}).values() if node is not None and "_target_" in node]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train, evaluate with full ranking and write ``metrics.json`` in ``paths.output_dir``."""
    L.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = instantiate(cfg.model, num_items=datamodule.num_items, _recursive_=False, _convert_="all")

    callbacks = _instantiate_all(cfg.get("callbacks"))
    has_validation = datamodule.has_validation
    if not has_validation:  # protocol=paper: fixed epochs, no model selection
        callbacks = [c for c in callbacks if not isinstance(c, (ModelCheckpoint, EarlyStopping))]
    throughput = next((c for c in callbacks if isinstance(c, EpochThroughput)), None)
    if throughput is None:
        throughput = EpochThroughput()
        callbacks.append(throughput)
    trainer_kwargs = {} if has_validation else {"limit_val_batches": 0, "enable_checkpointing": False}
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=_instantiate_all(cfg.get("logger")) or False, **trainer_kwargs
    )

    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start

    checkpoint = trainer.checkpoint_callback if has_validation else None
    best_path = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    last_path = None
    if not has_validation:  # no model selection: the last weights are the result
        last_path = str(out_dir / "checkpoints" / "last.ckpt")
        trainer.save_checkpoint(last_path)
    results: dict[str, Any] = {"val": {}, "test": {}}
    if has_validation:
        val = trainer.validate(module, datamodule=datamodule, ckpt_path=best_path, verbose=False)
        results["val"] = _strip(val[0], "val/")
    if cfg.get("test", True):
        test = trainer.test(module, datamodule=datamodule, ckpt_path=best_path, verbose=False)
        results["test"] = _strip(test[0], "test/")

    report = {
        **results,
        "best_checkpoint": best_path,
        "last_checkpoint": last_path,
        "best_epoch": _epoch_of(best_path),
        "epochs_trained": trainer.current_epoch,
        "fit_wall_time_s": fit_seconds,
        "throughput": throughput.summary(),
        "card": device_name(),
        "torch": torch.__version__,
        "kernels": {
            "flags": dict(cfg.model.kernels),
            "fallbacks": module.manager.fallbacks(),
            "availability": module.manager.get_operator_availability(),
            "stats": module.manager.get_stats(),
        },
        "data": datamodule.stats,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print_report(report, path)
    return report


def _strip(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {k[len(prefix):]: float(v) for k, v in metrics.items() if k.startswith(prefix)}


def _epoch_of(path: str | None) -> int | None:
    if not path:
        return None
    match = re.search(r"epoch=?(\d+)", Path(path).stem)
    return int(match.group(1)) if match else None


def print_report(report: dict[str, Any], path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    names = list(report["test"] or report["val"])
    table = Table(title=f"Full-ranking metrics ({report['card']})")
    table.add_column("split")
    for name in names:
        table.add_column(name, justify="right")
    for split in ("val", "test"):
        if report[split]:
            table.add_row(split, *(f"{report[split].get(n, float('nan')):.4f}" for n in names))
    console = Console()
    console.print(table)
    tp = report["throughput"]
    if tp:
        console.print(
            f"epochs {report['epochs_trained']}, best epoch {report['best_epoch']}, fit {report['fit_wall_time_s']:.1f}s, "
            f"{tp['samples_per_sec']:.0f} samples/s, {tp['tokens_per_sec']:.0f} tokens/s, "
            f"{tp['epoch_time_s']:.2f}s/epoch"
        )
    if report["kernels"]["fallbacks"]:
        console.print(f"kernel fallbacks: {report['kernels']['fallbacks']}")
    console.print(f"metrics written to {path}")
