"""One Prefect API for a whole run: the user's ``PREFECT_API_URL``, else the server answering on the port,
else a ``prefect server start`` launched now and left running for its UI (``stop`` ends only that one)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from pipeline.config import PROJECT_ROOT

HOST = "127.0.0.1"
DEFAULT_PORT = 4200
STATE_DIR = ".prefect"  # git-ignored
PID_FILE = "project-server.json"
LOG_FILE = "project-server.log"
# First start on a busy 2-core machine runs the database migrations: allow minutes, not Prefect's 20 s.
START_TIMEOUT_S = 300.0
STOP_GRACE_S = 20.0
HEALTH_TIMEOUT_S = 3.0


class ServerError(RuntimeError):
    """The server could not be started or reached; the message says what to do."""


@dataclass(frozen=True)
class PrefectApi:
    url: str
    origin: str  # "PREFECT_API_URL" | "running" | "started"

    def describe(self) -> str:
        ui = self.url.removesuffix("/api")
        return {
            "PREFECT_API_URL": f"Prefect: your PREFECT_API_URL {self.url}",
            "running": f"Prefect: using the server already running at {ui}",
            "started": f"Prefect: started a server for this and later runs at {ui} "
                       "(`make prefect-stop` stops it)",
        }[self.origin]


def configured_api_url() -> str | None:
    """PREFECT_API_URL from the environment, else from the active Prefect profile (``prefect config set``);
    the environment is read first because Prefect reads it only once, at import."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def local_api_url(port: int) -> str:
    return f"http://{HOST}:{port}/api"


def answers(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=HEALTH_TIMEOUT_S).is_success
    except httpx.HTTPError:
        return False


def _state_dir(project_dir: Path) -> Path:
    return project_dir / STATE_DIR


def _read_record(project_dir: Path) -> dict | None:
    try:
        return json.loads((_state_dir(project_dir) / PID_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_server(port: int, project_dir: Path = PROJECT_ROOT, timeout_s: float = START_TIMEOUT_S) -> str:
    """Launch ``prefect server start`` on HOST:port in its own session and wait until it answers."""
    state = _state_dir(project_dir)
    state.mkdir(parents=True, exist_ok=True)
    log_path = state / LOG_FILE
    prefect = Path(sys.executable).with_name("prefect")
    command = [str(prefect), "server", "start", "--host", HOST, "--port", str(port)]
    # The server serves its own API: a client URL inherited from the caller must not leak into it.
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    with open(log_path, "ab") as log:
        # A session of its own: the server outlives `make run` and a Ctrl-C there does not reach it.
        process = subprocess.Popen(command, cwd=project_dir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    url = local_api_url(port)
    (state / PID_FILE).write_text(json.dumps({"pid": process.pid, "port": port, "url": url}), encoding="utf-8")
    deadline = time.monotonic() + timeout_s
    while not answers(url):
        if process.poll() is not None:
            (state / PID_FILE).unlink(missing_ok=True)
            tail = log_path.read_text(errors="replace")[-2000:]
            raise ServerError(f"`{' '.join(command)}` exited with code {process.returncode} (log: {log_path}):"
                              f"\n{tail}\nIs port {port} taken by another program? Pick another with "
                              "PREFECT_PORT=... (make) or --port.")
        if time.monotonic() > deadline:
            stop_server(project_dir)
            raise ServerError(f"the Prefect server did not answer on {url} within {timeout_s:.0f} s "
                              f"(log: {log_path})")
        time.sleep(0.5)
    return url


def ensure_server(port: int, project_dir: Path = PROJECT_ROOT) -> PrefectApi:
    """The one API of a run: the user's PREFECT_API_URL, else a server on HOST:port (started if needed)."""
    if configured := configured_api_url():
        return PrefectApi(configured, "PREFECT_API_URL")
    url = local_api_url(port)
    if answers(url):
        return PrefectApi(url, "running")
    return PrefectApi(start_server(port, project_dir), "started")


def stop_server(project_dir: Path = PROJECT_ROOT) -> str:
    """Stop the server :func:`start_server` started (never another one); returns what happened."""
    record = _read_record(project_dir)
    pid_path = _state_dir(project_dir) / PID_FILE
    if record is None:
        return "Prefect: no server started by this project is recorded; nothing stopped"
    pid = int(record["pid"])
    if _alive(pid):
        # The process group: `prefect server start` runs the API and its services in children.
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
    pid_path.unlink(missing_ok=True)
    return f"Prefect: stopped the server at {record['url'].removesuffix('/api')}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher server",
                                     description="The one Prefect server of this project's runs.")
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port on 127.0.0.1 (default 4200)")
    args = parser.parse_args(argv)
    if args.action == "stop":
        print(stop_server(), file=sys.stderr)
        return 0
    if args.action == "status":
        url = configured_api_url() or local_api_url(args.port)
        state = "answers" if answers(url) else "does not answer"
        print(f"Prefect API {url} {state}", file=sys.stderr)
        return 0 if state == "answers" else 1
    try:
        api = ensure_server(args.port)
    except ServerError as exc:
        print(f"Prefect: {exc}", file=sys.stderr)
        return 1
    print(api.describe(), file=sys.stderr)
    print(api.url)
    return 0
