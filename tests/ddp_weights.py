"""Trains the tiny DDP run of tests/test_ddp.py and writes each rank's parameter sum after every step to
<out_dir>/parameter_sum_rank<N>.txt, with a line on how DDP holds the gradients (a script: Lightning's
launcher re-runs it for rank 1; a file per rank, since two processes writing one stdout pipe can lose a
line to the other's partial output).
Usage: python tests/ddp_weights.py <out_dir> [override ...]"""
import sys
from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_dir

import hstu.config  # noqa: F401  (registers the config schemas)
import hstu.train
from hstu.train import train

ROOT = Path(__file__).resolve().parents[1]


class WriteParameterSum(L.Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        """After each step: the parameter sum, and how DDP holds the gradients (its flags, its comm hook, and
        in how many storages the gradients lie: one per bucket when they are views of DDP's buckets)."""
        ddp = trainer.strategy.model
        total = sum(p.detach().double().sum().item() for p in pl_module.parameters())
        storages = len({p.grad.untyped_storage().data_ptr() for p in ddp.parameters()})
        (self.out / f"parameter_sum_rank{trainer.global_rank}.txt").write_text(
            f"rank {trainer.global_rank} steps {trainer.global_step} parameter sum {total!r}\n"
            f"gradient_as_bucket_view {ddp.gradient_as_bucket_view} static_graph {ddp.static_graph} "
            f"comm_hook {ddp._get_ddp_logging_data().get('comm_hook')} "
            f"gradient_storages {storages} of {len(list(ddp.parameters()))}\n")


def main(out: Path, overrides: list[str]) -> None:
    with_run_callbacks = hstu.train._with_run_callbacks
    hstu.train._with_run_callbacks = lambda callbacks: with_run_callbacks([*callbacks, WriteParameterSum(out)])
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={out}", f"paths.data_dir={out / 'data'}"])
    train(cfg)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
