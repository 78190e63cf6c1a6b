"""Re-evaluate a run's checkpoint on the test split: python scripts/eval.py run_dir=... [ckpt_path=...] [devices=N]"""
import json
from pathlib import Path

import hydra
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from hstu.export import evaluate_run
from hstu.train import print_report


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    kernels = OmegaConf.to_container(cfg.kernels) if cfg.kernels is not None else None
    report = evaluate_run(cfg.run_dir, cfg.ckpt_path, accelerator=cfg.accelerator, kernels=kernels,
                          data_dir=cfg.data_dir, devices=cfg.devices, num_nodes=cfg.num_nodes)
    if rank_zero_only.rank != 0:
        return  # every process ranked its slice of the users; rank zero reports the sums
    path = Path(cfg.out_file)
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"checkpoint {report['checkpoint']}; test metrics recorded at training: {report['recorded_test']}")
    print_report(report, path)


if __name__ == "__main__":
    main()
