"""Export a training run for serving: python scripts/export.py run_dir=outputs/<date>/<time> [ckpt_path=...] [compiled=cpu]"""
import hydra
from omegaconf import DictConfig

from hstu.config import check_keys_set
from hstu.export import export_run
from hstu.inference import read_export_config


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    check_keys_set(cfg)
    out_dir = export_run(cfg.run_dir, cfg.out_dir, ckpt_path=cfg.ckpt_path, data_dir=cfg.data_dir,
                         overwrite=cfg.overwrite, compiled=cfg.compiled, compiled_k=cfg.compiled_k)
    print(f"exported {cfg.run_dir} to {out_dir}")
    for name, package in read_export_config(out_dir).get("compiled", {}).items():
        print(f"compiled scoring package for this {package['device']} machine: {out_dir / name}")


if __name__ == "__main__":
    main()
