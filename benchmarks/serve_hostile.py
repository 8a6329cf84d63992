"""Serving under hostile load (issue 20): good clients beside clients sending cheap-but-expensive requests,
memory under a burst of maximum-size bodies, and the speed of the guarded service against the one before.

    python -m benchmarks.serve_hostile [--duration 10] [--baseline-rev REV] [--out FILE.json]

Load comes from ``wrk`` (compiled; Debian package ``wrk``), one process for the good clients
(benchmarks/wrk_post.lua, a 28x28 PNG to /predict) and one for the hostile ones (benchmarks/wrk_rotate.lua,
raw requests in rotation); the burst of large bodies from 32 threads that only send and read sockets.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psutil

from benchmarks.load import BOUNDARY, build_model, cpu_model, glyph_png, lean_anchor, multipart_body, wrk
from pipeline.config import load_settings
from pipeline.contract import CLASSMAP_FILE, META_FILE, ONNX_FILE
from tests import bad_inputs
from tests.support import PROJECT_ROOT, background_process, free_port

CLIENTS = 16  # good clients, and as many hostile ones beside them
BURST = 32  # concurrent maximum-size bodies
ROTATE_LUA = PROJECT_ROOT / "benchmarks" / "wrk_rotate.lua"
P99_RATIO_MAX = 3.0
RSS_GROWTH_MAX_BUDGETS = 2.0  # a worker's peak under the burst: at most twice its body budget above its start
SPEED_LOSS_MAX = 0.05


def raw_request(path: str, body: bytes, content_type: str, content_length: int | None = None) -> bytes:
    length = len(body) if content_length is None else content_length
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode() + body


def hostile_files(work: Path) -> list[Path]:
    """The requests that once blocked a loop, hung for 30 s or cost seconds, one file each."""
    form = f"multipart/form-data; boundary={BOUNDARY}"
    big = bad_inputs.huge_png(4000, 4000)  # 16 Mpx in ~12 KB
    encoded = '["iVBORw0KGgo="]'
    requests = {
        "bitmap_16mpx": raw_request("/predict", multipart_body("image", [big]), form),
        "batch_4x16mpx": raw_request("/predict_batch", multipart_body("images", [big] * 4), form),
        "json_deep": raw_request("/predict_batch", b"[" * 100_000, "application/json"),
        "top_k_infinity": raw_request("/predict_batch", f'{{"images_base64": {encoded}, "top_k": Infinity}}'.encode(),
                                      "application/json"),
        "long_boundary": raw_request("/predict", b"--" + b"x" * 300 + b"\r\n",
                                     "multipart/form-data; boundary=" + "x" * 300),
        "empty_parts_40k": raw_request("/predict_batch", multipart_body("images", [b""] * 40_000), form),
        "short_content_length": raw_request("/predict", b"--" + BOUNDARY.encode(), form, content_length=5000),
    }
    files = []
    for name, data in requests.items():
        path = work / f"hostile-{name}.req"
        path.write_bytes(data)
        files.append(path)
    return files


def wrk_rotate(url: str, files: list[Path], connections: int, seconds: float) -> dict[str, Any]:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout=30s", "-s", str(ROTATE_LUA), url,
               "--", *map(str, files)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    raw = json.loads(output.strip().splitlines()[-1])
    return {"requests": raw["requests"], "non_2xx": raw["non_2xx"], "p50_ms": raw["p50_us"] / 1000,
            "p99_ms": raw["p99_us"] / 1000}


def worker_rss_mb(pid: int) -> dict[int, float]:
    """RSS of each process under the server (its workers), by pid."""
    rss = {}
    for child in psutil.Process(pid).children(recursive=True):
        with suppress(psutil.NoSuchProcess):
            rss[child.pid] = child.memory_info().rss / 2**20
    return rss


def burst(port: int, body: bytes, count: int) -> list[int]:
    """``count`` clients sending ``body`` to /predict_batch at once; their HTTP statuses."""
    request = raw_request("/predict_batch", body, f"multipart/form-data; boundary={BOUNDARY}")

    def one(_: int) -> int:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            with suppress(OSError):  # a server that answers early (503) may close before all is sent
                sock.sendall(request)
            with suppress(OSError, ValueError, IndexError):
                return int(sock.recv(4096).split(b" ", 2)[1])
        return 0

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def memory_under_burst(port: int, pid: int, serve: Any) -> dict[str, Any]:
    per_file = serve.max_upload_bytes - 1024
    count = max(1, (serve.max_request_bytes - 64 * 1024) // (per_file + 200))  # the largest body accepted
    body = multipart_body("images", [b"\x89PNG\r\n\x1a\n" + os.urandom(per_file)] * count)
    before = worker_rss_mb(pid)
    peak = dict(before)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for worker, rss in worker_rss_mb(pid).items():
                peak[worker] = max(peak.get(worker, 0.0), rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    statuses = burst(port, body, BURST)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return {"bodies": BURST, "body_mb": round(len(body) / 2**20, 1), "seconds": round(seconds, 2),
            "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
            "worker_rss_before_mb": sorted(round(v, 1) for v in before.values()),
            "worker_rss_peak_mb": sorted(round(v, 1) for v in peak.values()),
            "budget_mb": round(serve.worker_body_budget_bytes / 2**20, 1)}


@contextmanager
def bentoml_serve(cwd: Path, env: dict[str, str], log: Path) -> Iterator[tuple[str, int, int]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bentoml_cli = str(Path(sys.executable).with_name("bentoml"))
    with background_process([bentoml_cli, "serve", "service:Kuzushiji", "--host", "127.0.0.1", "--port", str(port)],
                            ready_url=f"{url}/readyz", env=env, cwd=cwd, log_path=log) as process:
        yield url, port, process.pid


def checkout(rev: str, dest: Path) -> Path:
    """The project's files at ``rev`` (git archive: no worktree, nothing changed in the repository)."""
    archive = dest / "rev.tar"
    subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), rev], cwd=PROJECT_ROOT, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest / "src", filter="data")
    return dest / "src"


def speed(urls: dict[str, str], single: Path, seconds: float, rounds: int) -> dict[str, Any]:
    """predict at 32 connections, the servers in turn, ``rounds`` times: throughput ratios within one run."""
    points: dict[str, list[float]] = {name: [] for name in urls}
    for _ in range(rounds):
        for name, url in urls.items():
            points[name].append(wrk(f"{url}/predict", single, 32, seconds)["requests_s"])
    means = {name: sum(values) / len(values) for name, values in points.items()}
    return {"requests_s": points, "mean_requests_s": {k: round(v, 1) for k, v in means.items()},
            "guarded_vs_before": round(means["guarded"] / means["before"], 3),
            "guarded_vs_lean": round(means["guarded"] / means["lean_anchor"], 3),
            "before_vs_lean": round(means["before"] / means["lean_anchor"], 3)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    serve = load_settings().serve
    work = Path(tempfile.mkdtemp(prefix="serve-hostile-"))
    build_model(work)
    env = {"BENTOML_HOME": str(work / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    subprocess.run([sys.executable, "-m", "pipeline.stages.package", "store", "--onnx", str(work / ONNX_FILE),
                    "--classmap", str(work / CLASSMAP_FILE), "--meta", str(work / META_FILE),
                    "--registry-version", "0"],
                   cwd=PROJECT_ROOT, env={**os.environ, **env}, check=True, capture_output=True)
    single = work / "single.body"
    single.write_bytes(multipart_body("image", [glyph_png()]))
    hostile = hostile_files(work)
    results: dict[str, Any] = {"load_average_before": [round(x, 2) for x in os.getloadavg()]}
    with bentoml_serve(PROJECT_ROOT, env, work / "guarded.log") as (url, port, pid):
        wrk(f"{url}/predict", single, 8, 3)  # warm-up
        alone = wrk(f"{url}/predict", single, CLIENTS, args.duration)
        with ThreadPoolExecutor(1) as pool:
            hostile_run = pool.submit(wrk_rotate, url, hostile, CLIENTS, args.duration + 2)
            time.sleep(1)  # the hostile clients are at it before the good ones start
            mixed = wrk(f"{url}/predict", single, CLIENTS, args.duration)
            hostile_point = hostile_run.result()
        results["mixed_load"] = {"good_alone": alone, "good_beside_hostile": mixed, "hostile": hostile_point,
                                 "p99_ratio": round(mixed["p99_ms"] / alone["p99_ms"], 2),
                                 "hostile_kinds": [p.stem.removeprefix("hostile-") for p in hostile]}
        print(json.dumps(results["mixed_load"]), flush=True)
        results["memory_burst"] = memory_under_burst(port, pid, serve)
        print(json.dumps(results["memory_burst"]), flush=True)
        if args.baseline_rev:
            before_src = checkout(args.baseline_rev, work)
            with bentoml_serve(before_src, env, work / "before.log") as (before_url, before_port, before_pid), \
                    lean_anchor(work, serve.threads) as (lean_url, _):
                results["memory_burst_before"] = memory_under_burst(before_port, before_pid, serve)
                print(json.dumps(results["memory_burst_before"]), flush=True)
                for server_url in (before_url, lean_url):
                    wrk(f"{server_url}/predict", single, 8, 3)
                results["speed_c32"] = speed({"guarded": url, "before": before_url, "lean_anchor": lean_url}, single,
                                             args.duration, args.rounds)
                results["speed_c32"]["baseline_rev"] = args.baseline_rev
                print(json.dumps(results["speed_c32"]), flush=True)
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    results["machine"] = {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "service_workers": psutil.cpu_count(),
                          "load_generator": "wrk, 1 thread a process, on the same cores as the servers",
                          "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}
    burst_point = results["memory_burst"]
    growth = max(p - b for p, b in zip(burst_point["worker_rss_peak_mb"], burst_point["worker_rss_before_mb"],
                                       strict=False))
    results["targets"] = {
        "good p99 beside hostile <= 3x alone": results["mixed_load"]["p99_ratio"] <= P99_RATIO_MAX,
        "worker RSS growth under the burst <= 2x its body budget": growth <= RSS_GROWTH_MAX_BUDGETS
        * burst_point["budget_mb"],
    }
    if "speed_c32" in results:
        results["targets"]["c32 throughput vs before >= 0.95"] = (
            results["speed_c32"]["guarded_vs_before"] >= 1 - SPEED_LOSS_MAX
        )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load point")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the c32 speed comparison")
    parser.add_argument("--baseline-rev", default=None, help="git revision of the service to compare speed with")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "serve_hostile.json")
    args = parser.parse_args()
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results["targets"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
