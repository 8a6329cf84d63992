"""The serving benchmarks' shared harness: a random-weight model, request bodies, ``wrk`` and the servers.

benchmarks/serve.py, serve_hostile.py, serve_tta.py, swap.py, feedback_loop.py and the hot-swap and
feedback-loop tests load the service through these, so every figure is taken the same way.
"""

from __future__ import annotations

import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml

from pipeline.contract import CLASSMAP_FILE, META_FILE, ONNX_FILE, ONNX_INPUT, onnx_session
from tests.support import PROJECT_ROOT, background_process, free_port

NUM_CLASSES = 49
CONCURRENCY = (1, 32, 64)
BATCH_REQUEST_IMAGES, BATCH_CONNECTIONS = 32, 4
SOAK_CONNECTIONS = 64
RAW_BATCHES = (1, 8, 32, 64, 128)
RAW_SECONDS_PER_POINT = 2.0
WARMUP_SECONDS = 3
WRK_TIMEOUT = "30s"  # wrk's default (2 s) would count slow answers as errors; the service's own limit is 30 s
BOUNDARY = "kuzushijibenchboundary"
LUA = PROJECT_ROOT / "benchmarks" / "wrk_post.lua"


# ------------------------------------------------------------------------------------- inputs


def build_model(work: Path) -> Path:
    """Random-weight SpinalVGG -> ``state.pt`` (seed-style app) and the service's ONNX/classmap/meta."""
    import torch

    from pipeline.data import OFFICIAL_CLASSMAPS
    from pipeline.export import export_onnx
    from pipeline.model import SpinalVGG

    torch.manual_seed(0)
    model = SpinalVGG(NUM_CLASSES).eval()
    torch.save(model.state_dict(), work / "state.pt")
    example = np.random.default_rng(0).integers(0, 256, (4, 1, 28, 28)).astype(np.float32)
    export_onnx(model, work / ONNX_FILE, example)
    classmap = OFFICIAL_CLASSMAPS["k49"]
    rows = [f"{i},{cp},{ch}" for i, (cp, ch) in enumerate(zip(classmap.codepoints, classmap.chars, strict=True))]
    (work / CLASSMAP_FILE).write_text("index,codepoint,char\n" + "\n".join(rows) + "\n", encoding="utf-8")
    (work / META_FILE).write_text(json.dumps({"dataset": "benchmark", "run_id": None}), encoding="utf-8")
    return work / "state.pt"


def glyph_png(seed: int = 0) -> bytes:
    """A 28x28 dataset-format PNG of a rendered character (what the page and most clients send)."""
    from PIL import Image

    from tests.bad_inputs import encode, ink

    glyph = np.clip(ink("ぬ", side=28, font_frac=0.85) + np.random.default_rng(seed).normal(0, 3, (28, 28)), 0, 255)
    return encode(Image.fromarray(glyph.astype(np.uint8)))


def multipart_body(field: str, files: list[bytes]) -> bytes:
    body = b""
    for index, data in enumerate(files):
        body += (
            (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="{index}.png"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    return body + f"--{BOUNDARY}--\r\n".encode()


# ------------------------------------------------------------------------------------- measuring


def raw_engine(onnx_path: Path, threads: int) -> dict[str, Any]:
    """ONNX Runtime alone: batch-1 latency and images/s per batch size."""
    session = onnx_session(onnx_path, threads)
    rng = np.random.default_rng(0)
    single = rng.integers(0, 256, (1, 1, 28, 28)).astype(np.float32)
    for _ in range(20):
        session.run(None, {ONNX_INPUT: single})
    latencies = []
    for _ in range(300):
        start = time.perf_counter()
        session.run(None, {ONNX_INPUT: single})
        latencies.append((time.perf_counter() - start) * 1000)
    throughput = {}
    for batch in RAW_BATCHES:
        x = rng.integers(0, 256, (batch, 1, 28, 28)).astype(np.float32)
        session.run(None, {ONNX_INPUT: x})
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < RAW_SECONDS_PER_POINT:
            session.run(None, {ONNX_INPUT: x})
            count += batch
        throughput[batch] = count / (time.perf_counter() - start)
    best = max(throughput, key=throughput.__getitem__)
    return {
        "threads": threads,
        "batch1_p50_ms": round(statistics.median(latencies), 3),
        "throughput_img_s": {str(k): round(v, 1) for k, v in throughput.items()},
        "best_batch": best,
        "best_throughput_img_s": round(throughput[best], 1),
    }


def require_wrk() -> None:
    """Fail now, with what to do, rather than in a load thread whose error would surface as a missing key."""
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk not found: apt-get install -y wrk (Debian package), then run again")


def wrk(url: str, body_file: Path, connections: int, seconds: float) -> dict[str, Any]:
    """One wrk run (one thread: the load generator shares the server's cores and should take little)."""
    require_wrk()
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds:g}s",
        f"--timeout={WRK_TIMEOUT}",
        "-s",
        str(LUA),
        url,
        "--",
        str(body_file),
        f"multipart/form-data; boundary={BOUNDARY}",
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    raw = json.loads(output.strip().splitlines()[-1])
    errors = {kind: raw[kind] for kind in ("connect_errors", "read_errors", "write_errors", "non_2xx", "timeouts")}
    seconds_run = raw["duration_us"] / 1e6
    return {
        "connections": connections,
        "seconds": round(seconds_run, 2),
        "requests": raw["requests"],
        "requests_s": round(raw["requests"] / seconds_run, 1),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "p50_ms": round(raw["p50_us"] / 1000, 2),
        "p90_ms": round(raw["p90_us"] / 1000, 2),
        "p99_ms": round(raw["p99_us"] / 1000, 2),
        "max_ms": round(raw["max_us"] / 1000, 2),
    }


def tree_rss_mb(pid: int) -> float:
    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    total = 0
    for process in processes:
        with suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return round(total / 2**20, 1)


# ------------------------------------------------------------------------------------- servers


def write_params(work: Path, name: str, **serve: Any) -> Path:
    """params.yaml with some serve.* keys replaced, for one variant of the service."""
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["serve"].update(serve)
    path = work / f"params-{name}.yaml"
    path.write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    return path


@contextmanager
def service(work: Path, name: str, env: dict[str, str], cwd: Path = PROJECT_ROOT) -> Iterator[tuple[str, int]]:
    """``bentoml serve`` of ``cwd``'s service.py on a free loopback port, logging to ``work/name.log``: (URL, pid)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bentoml_cli = str(Path(sys.executable).with_name("bentoml"))
    with background_process(
        [bentoml_cli, "serve", "service:Kuzushiji", "--host", "127.0.0.1", "--port", str(port)],
        ready_url=f"{url}/readyz",
        env=env,
        cwd=cwd,
        log_path=work / f"{name}.log",
    ) as process:
        yield url, process.pid


@contextmanager
def uvicorn_app(app: str, env: dict[str, str], ready_path: str, log_path: Path, *extra: str
                ) -> Iterator[tuple[str, int]]:
    """``app`` served by one uvicorn process on a free loopback port: (base URL, pid)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with background_process(
        [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning", *extra],
        ready_url=f"{url}{ready_path}", env=env, cwd=PROJECT_ROOT, log_path=log_path,
    ) as process:
        yield url, process.pid


def lean_anchor(work: Path, threads: int) -> AbstractContextManager[tuple[str, int]]:
    env = {"KUZUSHIJI_LEAN_MODEL_DIR": str(work), "KUZUSHIJI_LEAN_THREADS": str(threads)}
    return uvicorn_app("benchmarks.lean_server:app", env, "/readyz", work / "lean.log", "--no-access-log")


def seed_style(work: Path, weights: Path, threads: int) -> AbstractContextManager[tuple[str, int]]:
    env = {
        "KUZUSHIJI_BASELINE_WEIGHTS": str(weights),
        "KUZUSHIJI_BASELINE_CLASSES": str(NUM_CLASSES),
        "KUZUSHIJI_BASELINE_THREADS": str(threads),
    }
    return uvicorn_app("benchmarks.fastapi_baseline:app", env, "/docs", work / "seed.log")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


