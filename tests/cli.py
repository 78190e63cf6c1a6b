"""Run a script's ``@hydra.main`` entry point inside the test process, as the command line would.

The same composition, checks, error printing and exit status as ``python scripts/<name>.py ...``,
without the seconds that starting a Python process with torch and Lightning costs. Hydra's global
state (its logging setup, GlobalHydra) is put back afterwards.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import runpy
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from hydra.core.global_hydra import GlobalHydra

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        """stderr's lines, without Hydra's hint about HYDRA_FULL_ERROR and blank lines."""
        return [line for line in self.stderr.splitlines()
                if line.strip() and not line.startswith("Set the environment variable HYDRA_FULL_ERROR")]


def run_script(name: str, *args: str) -> Result:
    script = SCRIPTS / f"{name}.py"
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    argv = sys.argv
    sys.argv = [str(script), *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
        GlobalHydra.instance().clear()
    return Result(code, out.getvalue(), err.getvalue())


def load_script(name: str, monkeypatch) -> ModuleType:
    """scripts/<name>.py imported as the module ``name``, with scripts/ on sys.path (a script imports its
    neighbours) and the module in sys.modules (dataclasses look their module up there) while the test runs."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module
