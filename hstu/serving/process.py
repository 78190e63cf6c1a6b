"""scripts/serve.py in a child process on a free loopback port, for tests and benchmarks.

The child gets its own process group, so that stopping it reaches LitServe's workers too: Ctrl-C
first (LitServe's graceful shutdown), a kill of that group after ``STOP_TIMEOUT_S``.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping

SERVE_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "serve.py"
STOP_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``with ServerProcess(export_dir, cwd, log_path, device="cpu", ...) as server: server.url``.

    ``overrides`` are scripts/serve.py's config keys; ``cwd`` is the child's working directory.
    """

    def __init__(self, export_dir: str | Path, cwd: str | Path, log_path: str | Path,
                 startup_timeout_s: float = 240.0, **overrides: Any):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cwd, self.log_path = Path(cwd), Path(log_path)
        self.startup_timeout_s = startup_timeout_s
        self.args = [sys.executable, str(SERVE_SCRIPT), f"export_dir={export_dir}", f"port={self.port}",
                     *(f"{key}={_hydra_value(value)}" for key, value in overrides.items())]
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "ServerProcess":
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(self.args, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}: {self.log()}")
            if self.healthy():
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the server was not healthy within {self.startup_timeout_s:g} s: {self.log()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def log(self) -> str:
        return self.log_path.read_text()[-3000:] if self.log_path.is_file() else ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _hydra_value(value: Any) -> str:
    """A Python value as a Hydra command-line override value (dicts as {key:value,...})."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{key}:{_hydra_value(item)}" for key, item in value.items()) + "}"
    return str(value)
