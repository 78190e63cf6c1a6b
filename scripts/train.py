"""Train an HSTU/SASRec recommender: python scripts/train.py [experiment=...] [model=...] [+triton=all]"""
import hydra
from omegaconf import DictConfig

import hstu.config  # noqa: F401  (registers the KernelFlags schema)
from hstu.train import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    report = train(cfg)
    return report["val"].get("ndcg@10")  # the objective of hparams_search sweeps


if __name__ == "__main__":
    main()
