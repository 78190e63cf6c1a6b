"""Re-evaluate a run's checkpoint on the test split: python scripts/eval.py run_dir=... [ckpt_path=...] [devices=N]"""
import json
from pathlib import Path

import hydra
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from hstu.config import check_keys_set
from hstu.errors import ConfigError, MissingFileError, OutputExistsError
from hstu.export import evaluate_run, is_evaluation_report, load_run
from hstu.files import write_text_atomically
from hstu.host_memory import computes_on_cpu, reuse_freed_host_memory
from hstu.train import print_report


def check_out_file(path: Path, overwrite: bool) -> None:
    """Refuse an out_file that cannot take the report: no folder for it, a folder in its place, or a file
    already there (unless ``overwrite`` and it is an earlier report: never a run's metrics.json or other file)."""
    if not path.parent.is_dir():
        raise MissingFileError(f"out_file={path}: {path.parent} is not an existing folder")
    if path.is_dir():
        raise ConfigError(f"out_file={path}: is a folder")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"out_file={path} exists; pass overwrite=true to replace it, or another out_file")
    if path.exists() and not is_evaluation_report(path):
        raise OutputExistsError(f"out_file={path}: not an earlier evaluation report, so overwrite=true does not "
                                "replace it; give another out_file")


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    check_keys_set(cfg)
    if computes_on_cpu(cfg.accelerator):
        reuse_freed_host_memory()
    run = load_run(cfg.run_dir)
    path = Path(cfg.out_file)
    check_out_file(path, cfg.overwrite)
    kernels = OmegaConf.to_container(cfg.kernels) if OmegaConf.is_config(cfg.kernels) else cfg.kernels
    report = evaluate_run(run, cfg.ckpt_path, accelerator=cfg.accelerator, kernels=kernels,
                          data_dir=cfg.data_dir, devices=cfg.devices, num_nodes=cfg.num_nodes)
    if rank_zero_only.rank != 0:
        return  # every process ranked its slice of the users; rank zero reports the sums
    if cfg.overwrite:  # what appeared there while the evaluation ran is replaced only if it is a report
        check_out_file(path, overwrite=True)
    try:  # without overwrite, a report another evaluation wrote meanwhile is never replaced
        write_text_atomically(path, json.dumps(report, indent=2, default=str), replace=cfg.overwrite)
    except FileExistsError as error:
        raise OutputExistsError(f"out_file={path} was written while this evaluation ran; pass overwrite=true to "
                                "replace it, or another out_file") from error
    print(f"checkpoint {report['checkpoint']}")
    print_report(report, path)


if __name__ == "__main__":
    main()
