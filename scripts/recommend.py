"""Top-k items for a user: python scripts/recommend.py export_dir=... user=<id> | history=[ids] [k=10]"""
import time

import hydra
from omegaconf import DictConfig, OmegaConf

from hstu.data.sequences import CONSECUTIVE_ONLY
from hstu.errors import ConfigError
from hstu.inference import Recommender, training_history
from hstu.serving.config import check_recommend_config
from hstu_kernels.time_buckets import OUTSIDE_TIMESTAMP_RANGE, TIMESTAMP_BOUND


@hydra.main(version_base="1.3", config_path="../conf", config_name="recommend")
def main(cfg: DictConfig) -> None:
    check_recommend_config(cfg)
    if (cfg.user is None) == (cfg.history is None):
        raise ConfigError("give either user=<original user id> or history=[original item ids]")
    if cfg.user is not None and cfg.timestamps is not None:
        raise ConfigError("timestamps= goes with history=; user= takes the times of the user's events from the data")
    if cfg.history is not None:
        nested = [(i, item) for i, item in enumerate(OmegaConf.to_container(cfg.history))
                  if isinstance(item, (list, dict, bool)) or item is None]
        if nested:
            raise ConfigError(f"history: item {nested[0][0]} is {nested[0][1]!r}; give original item ids "
                              "(numbers or strings), oldest first")
    if cfg.request_time is not None and not -TIMESTAMP_BOUND <= cfg.request_time < TIMESTAMP_BOUND:
        raise ConfigError(f"request_time={cfg.request_time} {OUTSIDE_TIMESTAMP_RANGE}")
    recommender = Recommender.from_export(cfg.export_dir, device=cfg.device)
    request_time, repeats = cfg.request_time, None
    if cfg.user is not None:
        items, timestamps = training_history(recommender.config, cfg.user, cfg.data_dir)
    else:
        items = list(cfg.history)
        request_time = request_time if request_time is not None else int(time.time())
        timestamps = list(cfg.timestamps) if cfg.timestamps is not None else [request_time] * len(items)
        if cfg.timestamps is None:  # events at one made-up time: no exact repeat to tell, consecutive ones still
            repeats = CONSECUTIVE_ONLY if recommender.repeats == "collapse_consecutive" else "keep"
    (top,) = recommender.recommend([(items, timestamps)], k=cfg.k, request_time=request_time,
                                   exclude_seen=cfg.exclude_seen, unknown_items=cfg.unknown_items, repeats=repeats)
    events = recommender.prepare([(items, timestamps)], cfg.unknown_items, repeats)  # what the model read
    skipped = [item for item, known in zip(items, recommender.known_items(items)) if not known]
    recent = [recommender.item_original_ids[index - 1] for index in events.item_ids[-5:]]
    repeated = len(items) - len(skipped) - len(events.item_ids)
    print(f"history: {len(events.item_ids)} events, most recent {recent}"
          + (f"; skipped as unknown to the model: {skipped}" if skipped else "")
          + (f"; {repeated} dropped as repeats (data.repeats={recommender.repeats})" if repeated else ""))
    if len(top) < cfg.k:
        print(f"{len(top)} of k={cfg.k} items: the other items of the {recommender.model.num_items} are in the history "
              "(exclude_seen=true)")
    for rank, (item, score) in enumerate(top, start=1):
        print(f"{rank:4d}  {item}  {score:.4f}")


if __name__ == "__main__":
    main()
