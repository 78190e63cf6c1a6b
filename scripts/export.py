"""Export a training run for serving: python scripts/export.py run_dir=outputs/<date>/<time> [ckpt_path=...] [compiled=cpu]"""
import hydra
import torch
from omegaconf import DictConfig

from hstu.export import export_run
from hstu.serving.compiled import compile_export


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    out_dir = export_run(cfg.run_dir, cfg.out_dir, ckpt_path=cfg.ckpt_path, data_dir=cfg.data_dir,
                         overwrite=cfg.overwrite)
    print(f"exported {cfg.run_dir} to {out_dir}")
    if cfg.compiled != "none":
        device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.compiled == "auto" else cfg.compiled
        package = compile_export(out_dir, device, k=cfg.compiled_k)
        print(f"compiled scoring package for this {device} machine: {package}")


if __name__ == "__main__":
    main()
