"""Export a training run for serving: python scripts/export.py run_dir=outputs/<date>/<time> [ckpt_path=...]"""
import hydra
from omegaconf import DictConfig

from hstu.export import export_run


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    out_dir = export_run(cfg.run_dir, cfg.out_dir, ckpt_path=cfg.ckpt_path, data_dir=cfg.data_dir,
                         overwrite=cfg.overwrite)
    print(f"exported {cfg.run_dir} to {out_dir}")


if __name__ == "__main__":
    main()
