"""Train an HSTU/SASRec recommender: python scripts/train.py [experiment=...] [model=...] [+triton=all]"""
import hydra
from omegaconf import DictConfig

import hstu.config  # noqa: F401  (registers the config schemas and the run-directory resolver)
from hstu.host_memory import computes_on_cpu, reuse_freed_host_memory
from hstu.train import optimized_metric, train


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    if computes_on_cpu(cfg.trainer.get("accelerator")):
        reuse_freed_host_memory()
    report = train(cfg)
    return optimized_metric(cfg, report)  # the objective of hparams_search sweeps


if __name__ == "__main__":
    main()
