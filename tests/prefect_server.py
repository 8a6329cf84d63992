"""Helpers for the orchestration tests: tiny synthetic params, a real Prefect server per test session,
and queries of its API.

Import the fixture into a test module (``from tests.prefect_server import prefect_api``); pytest then
starts one ``prefect server start`` for the whole session (30-60 s on a small machine) and stops it.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from pipeline.config import CONF_DIR, CONF_NAME, compose
from tests.support import PROJECT_ROOT, background_process, free_port

VENV_BIN = Path(sys.executable).parent
SERVER_START_TIMEOUT_S = 300.0
POOL = "kuzushiji-process"  # the work pool prefect.yaml names
RUN_TIMEOUT_S = 1800
CLI_TIMEOUT_S = 300
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

# The smallest run that still exercises every stage: 49 synthetic classes, 18 train / 2 val / 5 test
# images per class, 1 training epoch, a tuning study of 3 trials x 2 epochs on 5 images per class.
# Low learning rates and no EMA so trials differ after a few batches (the pruning test needs that).
TINY: dict[str, Any] = {
    "data.dataset": "synthetic",
    "data.synthetic.train_per_class": 20,
    "data.synthetic.test_per_class": 5,
    "train.epochs": 1,
    "train.batch_size": 16,
    "train.lr": 0.01,
    "train.ema_decay": 0.0,
    "train.max_train_per_class": 5,
    "train.max_val_per_class": 2,
    "tune.n_trials": 3,
    "tune.epochs": 2,
    "tune.max_train_per_class": 5,
    "tune.max_val_per_class": 2,
    "tune.pruner_startup_trials": 1,
    "tune.pruner_warmup_epochs": 0,
    "tune.search_space": {
        "train.lr": {"type": "float", "low": 0.002, "high": 0.05, "log": True},
        "train.batch_size": {"type": "categorical", "choices": [16]},
        "model.dropout": {"type": "float", "low": 0.1, "high": 0.5},
    },
}
TINY_PROFILE = "quick"


def composed_params(profile: str, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The project's conf/ composed with ``profile``, then ``changes`` (dotted keys, each replacing the value
    it names)."""
    raw = compose({"profile": profile})
    for dotted, value in (changes or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = copy.deepcopy(value)
    return raw


def tiny_params(changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The quick profile, then :data:`TINY` and ``changes``."""
    return composed_params(TINY_PROFILE, {**TINY, **(changes or {})})


def write_tiny_params(folder: Path, changes: dict[str, Any] | None = None) -> Path:
    """Write tiny params to ``folder/params.yaml``: every output path then lands under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params(changes), sort_keys=False), encoding="utf-8")
    return path


def write_conf(project: Path, values: dict[str, Any]) -> None:
    """Make ``values`` the copy's conf/ defaults (their profile's overlay emptied), so `dvc exp run -S ...` in
    the copy composes them too, and write them to its params.yaml."""
    conf = project / CONF_DIR
    (conf / f"{CONF_NAME}.yaml").write_text(
        yaml.safe_dump({"defaults": ["_self_", {"profile": values["profile"]}], **values}, sort_keys=False,
                       allow_unicode=True),
        encoding="utf-8")
    for profile in (conf / "profile").glob("*.yaml"):  # every profile keeps only its name
        profile.write_text(f"# @package _global_\nprofile: {profile.stem}\n", encoding="utf-8")
    (project / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False, allow_unicode=True),
                                         encoding="utf-8")


def client_env(api_url: str, home: Path, **extra: str) -> dict[str, str]:
    """Environment of a process that reports to the test server (never the user's ~/.prefect)."""
    return {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_TRACKING_URI": "",  # each test's settings root holds its own SQLite store
        **extra,
    }


@contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """A real Prefect server on a free loopback port, its database in ``home``; yields its API URL, always stops."""
    port = free_port()
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": "",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    with background_process(
        [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        ready_url=f"http://127.0.0.1:{port}/api/health",
        env=env,
        cwd=home,
        log_path=home / "server.log",
        ready_timeout_s=SERVER_START_TIMEOUT_S,
    ):
        yield f"http://127.0.0.1:{port}/api"


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """API URL of a real Prefect server on a free loopback port, database in a temp PREFECT_HOME."""
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as url:
        yield url


def flow_runs(api_url: str, flow_name: str | None = None, **flow_run_filter: Any) -> list[dict[str, Any]]:
    """Flow runs of ``flow_name`` (any flow if None) matching a Prefect API ``flow_runs`` filter, e.g.
    ``tags={"all_": ["dvc"]}``."""
    body: dict[str, Any] = {"flow_runs": flow_run_filter}
    if flow_name:
        body["flows"] = {"name": {"any_": [flow_name]}}
    response = httpx.post(f"{api_url}/flow_runs/filter", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def run_module(args: list[str], env: dict[str, str], cwd: Path, timeout_s: float) -> subprocess.CompletedProcess:
    """``python -m ...`` with the test venv, output captured."""
    return subprocess.run(
        [sys.executable, "-m", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s
    )


def copy_project(dest: Path, changes: dict[str, Any] | None = None, values: dict[str, Any] | None = None) -> Path:
    """A git repository at ``dest`` holding this checkout's files (tracked and not ignored, so work in
    progress is included), the DVC config and ``values`` as its conf/ (default: tiny params with ``changes``),
    committed once."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=PROJECT_ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = PROJECT_ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    write_conf(dest, values if values is not None else tiny_params(changes))
    git = ["git", "-C", str(dest)]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    # DVC experiments commit refs: give the throw-away repository an identity of its own.
    subprocess.run([*git, "config", "user.name", "pipeline tests"], check=True)
    subprocess.run([*git, "config", "user.email", "tests@localhost"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "test copy"], check=True)
    return dest


def prefect_cli(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    """``prefect ARGS`` with the test venv; its stdout, or an assertion error with its output."""
    result = subprocess.run([str(VENV_BIN / "prefect"), *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=CLI_TIMEOUT_S, check=False)
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def wait_for_flow_run(api_url: str, flow_run_id: str, worker_log: Path, timeout_s: float = RUN_TIMEOUT_S) -> dict:
    """The flow run once it is in a terminal state (polled every 2 s), or an assertion error with the log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = httpx.get(f"{api_url}/flow_runs/{flow_run_id}", timeout=30).json()
        if run["state_type"] in TERMINAL:
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} not finished in {timeout_s:.0f}s; worker log:\n"
                         f"{worker_log.read_text(errors='replace')[-5000:]}")
