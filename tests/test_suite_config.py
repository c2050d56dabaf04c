"""The test command cannot hang on a killed worker (issue 19, item 8): with the project's pytest
configuration, a worker killed by SIGKILL (as the kernel's OOM killer does) fails the run, which
ends; `--max-worker-restart=0` stops xdist from re-scheduling onto new workers, and
faulthandler_timeout dumps the stacks of a test stuck for 10 minutes."""
from __future__ import annotations

import pathlib
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_config_bounds_a_stuck_run():
    opts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--max-worker-restart=0" in opts["addopts"].split()
    assert 0 < int(opts["faulthandler_timeout"]) <= 900


def test_killed_worker_fails_the_run(tmp_path):
    pytest.importorskip("xdist")
    (tmp_path / "test_killed.py").write_text("import os, signal\n\ndef test_killed():\n"
                                             "    os.kill(os.getpid(), signal.SIGKILL)\n")
    (tmp_path / "test_fine.py").write_text("def test_fine():\n    assert True\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir",
                          str(tmp_path), "-p", "no:cacheprovider", str(tmp_path)],
                         capture_output=True, text=True, timeout=180, cwd=tmp_path)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "crashed while running" in out and "1 failed, 1 passed" in out, out
