"""Helpers shared by the tests: free loopback ports, waiting on HTTP, and background servers that are
always stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from pipeline.config import PROJECT_ROOT  # noqa: F401  (re-exported for the tests)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout_s: float = 120.0, process: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers 2xx; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout_s
    last_error = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode} before {url} answered")
        try:
            response = httpx.get(url, timeout=5.0)
            if response.is_success:
                return
            last_error = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            last_error = repr(exc)
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f}s ({last_error})")


@contextmanager
def background_process(
    args: Sequence[str],
    *,
    ready_url: str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    log_path: Path | None = None,
    ready_timeout_s: float = 180.0,
) -> Iterator[subprocess.Popen]:
    """Start a server in its own process group, wait until ``ready_url`` answers, always stop it."""
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(
        list(args),
        env={**os.environ, **(env or {})},
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        if ready_url:
            try:
                wait_for_http(ready_url, ready_timeout_s, process)
            except (RuntimeError, TimeoutError) as exc:
                tail = log_path.read_text(errors="replace")[-4000:] if log_path else ""
                raise RuntimeError(f"{exc}\n--- server log tail ---\n{tail}") from None
        yield process
    finally:
        stop_group(process)
        if log_path:
            log.close()


def stop_group(process: subprocess.Popen, grace_s: float = 15.0, stop_signal: int = signal.SIGTERM) -> None:
    """Send ``stop_signal`` to the process group, SIGKILL it after ``grace_s``."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, stop_signal)
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass
