"""Config schemas and checks of scripts/recommend.py and scripts/serve.py.

``conf/recommend.yaml`` extends ``schema/recommend`` and ``conf/serve.yaml`` ``schema/serve``, registered
in Hydra's ConfigStore as hstu/config.py registers ``schema/train``: a value of the wrong type fails
when Hydra composes the config, naming the key (``k=ten``, ``history=12``, ``port=80OO``).
:func:`check_recommend_config` and :func:`check_serve_config` test ranges, choices, kernel flags and
the device (and for serving, that the port is free) before anything is loaded or printed, naming the
key as typed.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from hstu.config import Check, above, at_least, checked, config_errors, kernel_flag_errors, one_of, strict_schema
from hstu.errors import ConfigError
from hstu.serving.histories import UNKNOWN_ITEM_POLICIES

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe binds to; loopback unless told otherwise
HOST_ALIASES = {"localhost": "127.0.0.1"}
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")  # uvicorn's names that LitServe also knows


@dataclass
class RecommendConfig:
    """conf/recommend.yaml (defaults there)."""

    export_dir: str = MISSING
    user: Any = MISSING
    history: Optional[List[Any]] = MISSING
    timestamps: Optional[List[int]] = MISSING
    request_time: Optional[int] = MISSING
    k: int = MISSING  # its range is the request's check (Recommender.recommend)
    exclude_seen: bool = MISSING
    unknown_items: str = checked(one_of(*UNKNOWN_ITEM_POLICIES))
    device: str = MISSING
    data_dir: Optional[str] = MISSING


@dataclass
class ServeConfig:
    """conf/serve.yaml (defaults there)."""

    export_dir: str = MISSING
    device: str = checked(one_of("auto", "cpu", "cuda"))
    host: str = checked(one_of(*HOSTS, *HOST_ALIASES))
    port: int = checked(Check(lambda v: 1024 <= v <= 65535, "must lie in [1024, 65535] (what LitServe binds to)"))
    workers: int = checked(at_least(1))
    api_servers: int = checked(at_least(1))
    max_batch_size: int = checked(at_least(1))
    batch_timeout: float = checked(at_least(0))
    cache_bytes: int = checked(at_least(0))
    cuda_graphs: bool = MISSING
    graph_bytes: int = checked(at_least(0))
    compiled: bool = MISSING
    kernels: Any = MISSING  # null or {operator: bool}: hstu.config.kernel_flag_errors
    timeout: float = checked(above(0))
    warm_up: bool = MISSING
    log_level: str = checked(one_of(*LOG_LEVELS))
    stage_timing: bool = MISSING


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(group="schema", name="recommend", node=strict_schema(RecommendConfig))
    store.store(group="schema", name="serve", node=strict_schema(ServeConfig))


def device_errors(device: str) -> list[str]:
    """Why ``device`` cannot run here (none: it can)."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        return [f"device={device}: not a torch device (cpu, cuda, cuda:1 ...)"]
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            return [f"device={device}: no CUDA GPU is visible here (torch.cuda.is_available() is false); "
                    "use device=cpu"]
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            return [f"device={device}: only {torch.cuda.device_count()} CUDA GPU(s) are visible"]
    return []


def port_errors(host: str, port: int) -> list[str]:
    """Why the server cannot listen on ``host:port`` (none: it can), from a socket bound there as
    uvicorn binds it, and closed."""
    ipv6 = ":" in host
    with socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            address = f"[{host}]:{port}" if ipv6 else f"{host}:{port}"
            return [f"port={port}: cannot listen on {address} ({error.strerror}); "
                    "stop what listens there or pick another port"]
    return []


def check_recommend_config(cfg: DictConfig) -> None:
    """ConfigError naming every wrong key of a composed conf/recommend.yaml."""
    _raise(config_errors(cfg) + device_errors(cfg.device))


def check_serve_config(cfg: DictConfig) -> None:
    """ConfigError naming every wrong key of a composed conf/serve.yaml."""
    errors = config_errors(cfg) + kernel_flag_errors(cfg.kernels)
    if cfg.device == "cuda":
        errors += device_errors(cfg.device)
    if cfg.batch_timeout > cfg.timeout:  # LitServe's rule: a request would time out waiting for its batch
        errors.append(f"batch_timeout={cfg.batch_timeout}: must not exceed timeout={cfg.timeout}")
    if not errors:  # host and port are valid
        errors += port_errors(HOST_ALIASES.get(cfg.host, cfg.host), cfg.port)
    _raise(errors)


def _raise(errors: list[str]) -> None:
    if errors:
        raise ConfigError("; ".join(dict.fromkeys(errors)))


register_configs()
