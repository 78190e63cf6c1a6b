"""Serve an export folder over HTTP: python scripts/serve.py export_dir=... [device=cuda] [port=8000]

With cache_bytes=0 (or a model the KV cache cannot serve) the engine loads the export's compiled scoring
package (scoring-*.pt2), native code that runs in the inference workers: serve only export folders you
trust, or serve with compiled=false (the package is never loaded).
"""
import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from hstu.serving.config import HOST_ALIASES, check_serve_config


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    check_serve_config(cfg)
    from hstu.serving.server import build_server  # LitServe (the serve extra), once the config is checked
    host = HOST_ALIASES.get(cfg.host, cfg.host)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    kernels = OmegaConf.to_container(cfg.kernels) if cfg.kernels is not None else None
    server = build_server(cfg.export_dir, device=device, workers=cfg.workers, max_batch_size=cfg.max_batch_size,
                          batch_timeout=cfg.batch_timeout, cache_bytes=cfg.cache_bytes,
                          cuda_graphs=cfg.cuda_graphs, graph_bytes=cfg.graph_bytes, compiled=cfg.compiled,
                          kernels=kernels,
                          timeout=cfg.timeout, warm_up=cfg.warm_up, stage_timing=cfg.stage_timing)
    print(f"serving {cfg.export_dir} on http://{host}:{cfg.port} ({device}, {cfg.workers} worker(s))", flush=True)
    server.run(host=host, port=cfg.port, num_api_servers=cfg.api_servers, log_level=cfg.log_level,
               generate_client_file=False)


if __name__ == "__main__":
    main()
