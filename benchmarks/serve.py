"""Serving benchmark on this machine (CPU): raw ONNX Runtime, the BentoML service, the FastAPI baseline.

    python -m benchmarks.serve [--duration 10] [--soak 60] [--out benchmarks/results/serve_cpu.json]

(a) raw ONNX Runtime: batch-1 latency and throughput for batches 1..128 (serve.threads intra-op threads);
(b) the BentoML service (a real `bentoml serve` on 127.0.0.1): `predict` p50/p99 latency and throughput
    at 1, 8, 32 and 64 concurrent clients, `predict_batch` with batches of 32;
(c) the original design's baseline (benchmarks/fastapi_baseline.py: FastAPI, async endpoint, eager
    PyTorch per request) with the same weights, same machine, same run;
(d) 64 clients for --soak seconds: errors and the server's RSS (all its processes) at start and end.
Model: SpinalVGG with random weights, 49 classes (speed does not depend on the weights). Uploads are
28x28 dataset-format PNGs. The load generator (httpx, asyncio) runs on the same cores as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from pipeline.config import load_settings
from tests.support import PROJECT_ROOT, background_process, free_port

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
CONCURRENCY = (1, 8, 32, 64)
BATCH_REQUEST_IMAGES = 32
SOAK_CLIENTS = 64
NUM_CLASSES = 49
RAW_SECONDS_PER_POINT = 3.0
TARGET_THROUGHPUT_VS_RAW = 0.7
TARGET_VS_BASELINE = 3.0
TARGET_P50_FACTOR, TARGET_P50_SLACK_MS = 2.0, 3.0


def build_model(work: Path) -> tuple[Path, Path]:
    """Random-weight SpinalVGG -> state dict (baseline) + ONNX/classmap/meta (service)."""
    import torch

    from pipeline.data import OFFICIAL_CLASSMAPS
    from pipeline.export import export_onnx
    from pipeline.model import SpinalVGG

    torch.manual_seed(0)
    model = SpinalVGG(NUM_CLASSES).eval()
    weights = work / "state.pt"
    torch.save(model.state_dict(), weights)
    example = np.random.default_rng(0).integers(0, 256, (4, 1, 28, 28)).astype(np.float32)
    export_onnx(model, work / "model.onnx", example)
    classmap = OFFICIAL_CLASSMAPS["k49"]
    rows = [f"{i},{cp},{ch}" for i, (cp, ch) in enumerate(zip(classmap.codepoints, classmap.chars, strict=True))]
    (work / "classmap.csv").write_text("index,codepoint,char\n" + "\n".join(rows) + "\n", encoding="utf-8")
    (work / "meta.json").write_text(json.dumps({"dataset": "benchmark", "run_id": None}), encoding="utf-8")
    return weights, work / "model.onnx"


def raw_engine(onnx_path: Path, threads: int) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    single = rng.integers(0, 256, (1, 1, 28, 28)).astype(np.float32)
    for _ in range(20):
        session.run(None, {"images": single})
    latencies = []
    for _ in range(300):
        start = time.perf_counter()
        session.run(None, {"images": single})
        latencies.append((time.perf_counter() - start) * 1000)
    throughput = {}
    for batch in BATCHES:
        x = rng.integers(0, 256, (batch, 1, 28, 28)).astype(np.float32)
        session.run(None, {"images": x})
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < RAW_SECONDS_PER_POINT:
            session.run(None, {"images": x})
            count += batch
        throughput[batch] = count / (time.perf_counter() - start)
    best = max(throughput, key=throughput.get)
    return {"batch1_p50_ms": statistics.median(latencies), "batch1_p99_ms": float(np.percentile(latencies, 99)),
            "throughput_img_s": {str(k): round(v, 1) for k, v in throughput.items()},
            "best_batch": best, "best_throughput_img_s": round(throughput[best], 1)}


def glyph_png(seed: int = 0) -> bytes:
    from PIL import Image

    from tests.bad_inputs import encode, ink

    glyph = np.clip(ink("ぬ", side=28, font_frac=0.85) + np.random.default_rng(seed).normal(0, 3, (28, 28)), 0, 255)
    return encode(Image.fromarray(glyph.astype(np.uint8)))


async def load(url: str, path: str, clients: int, seconds: float, files_for) -> dict:
    """``clients`` tasks, each sending requests back to back for ``seconds``."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:

        async def worker() -> None:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    response = await client.post(path, files=files_for())
                    if response.status_code != 200:
                        errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1
                        continue
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                latencies.append((time.perf_counter() - start) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return {"clients": clients, "requests": len(latencies), "errors": errors,
            "p50_ms": round(statistics.median(latencies), 2) if latencies else None,
            "p99_ms": round(float(np.percentile(latencies, 99)), 2) if latencies else None,
            "requests_s": round(len(latencies) / elapsed, 1)}


def tree_rss_mb(pid: int) -> float:
    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    return round(sum(p.memory_info().rss for p in processes if p.is_running()) / 2**20, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load point")
    parser.add_argument("--soak", type=float, default=60.0, help="seconds of the 64-client soak")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "serve_cpu.json")
    args = parser.parse_args()
    serve = load_settings().serve
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    weights, onnx_path = build_model(work)
    env = {"BENTOML_HOME": str(work / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    subprocess.run([sys.executable, "-m", "pipeline.bento", "store", "--onnx", str(onnx_path), "--classmap",
                    str(work / "classmap.csv"), "--meta", str(work / "meta.json"), "--registry-version", "0"],
                   cwd=PROJECT_ROOT, env={**os.environ, **env}, check=True, capture_output=True)
    print("raw engine ...", flush=True)
    results: dict = {"raw_onnxruntime": raw_engine(onnx_path, serve.threads)}
    print(results["raw_onnxruntime"], flush=True)
    png = glyph_png()
    single = lambda: {"image": ("g.png", png, "image/png")}  # noqa: E731
    batch = lambda: [("images", (f"{i}.png", png, "image/png")) for i in range(BATCH_REQUEST_IMAGES)]  # noqa: E731

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bentoml_cli = str(Path(sys.executable).with_name("bentoml"))
    with background_process([bentoml_cli, "serve", "service:Kuzushiji", "--host", "127.0.0.1", "--port", str(port)],
                            ready_url=f"{url}/readyz", env=env, cwd=PROJECT_ROOT, log_path=work / "bento.log") as proc:
        asyncio.run(load(url, "/predict", 8, 3.0, single))  # warm-up (and the dispatcher's training)
        service = {}
        for clients in CONCURRENCY:
            service[f"predict_c{clients}"] = asyncio.run(load(url, "/predict", clients, args.duration, single))
            print(service[f"predict_c{clients}"], flush=True)
        point = asyncio.run(load(url, "/predict_batch", 4, args.duration, batch))
        point["images_s"] = round(point["requests_s"] * BATCH_REQUEST_IMAGES, 1)
        service[f"predict_batch{BATCH_REQUEST_IMAGES}_c4"] = point
        print(point, flush=True)
        rss_start = tree_rss_mb(proc.pid)
        soak = asyncio.run(load(url, "/predict", SOAK_CLIENTS, args.soak, single))
        soak.update(rss_start_mb=rss_start, rss_end_mb=tree_rss_mb(proc.pid), seconds=args.soak)
        service["soak_c64"] = soak
        print(soak, flush=True)
    results["bentoml_service"] = service

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    base_env = {"KUZUSHIJI_BASELINE_WEIGHTS": str(weights), "KUZUSHIJI_BASELINE_CLASSES": str(NUM_CLASSES),
                "KUZUSHIJI_BASELINE_THREADS": str(serve.threads)}
    with background_process([sys.executable, "-m", "uvicorn", "benchmarks.fastapi_baseline:app", "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                            ready_url=f"{url}/docs", env=base_env, cwd=PROJECT_ROOT, log_path=work / "base.log"):
        asyncio.run(load(url, "/predict", 8, 3.0, single))
        baseline = {f"predict_c{c}": asyncio.run(load(url, "/predict", c, args.duration, single)) for c in (1, 32)}
        print(baseline, flush=True)
    results["fastapi_baseline"] = baseline

    raw = results["raw_onnxruntime"]
    c1, c32 = service["predict_c1"], service["predict_c32"]
    results["targets"] = {
        "predict_c32_vs_raw_best": {"ratio": round(c32["requests_s"] / raw["best_throughput_img_s"], 3),
                                    "target": TARGET_THROUGHPUT_VS_RAW},
        "predict_c32_vs_baseline_c32": {"ratio": round(c32["requests_s"] / baseline["predict_c32"]["requests_s"], 3),
                                        "target": TARGET_VS_BASELINE},
        "predict_c1_p50_ms": {"value": c1["p50_ms"], "limit": round(TARGET_P50_FACTOR * raw["batch1_p50_ms"]
                                                                    + TARGET_P50_SLACK_MS, 2)},
    }
    for target in results["targets"].values():
        target["holds"] = (target["ratio"] >= target["target"]) if "ratio" in target else (target["value"] <= target["limit"])
    results["machine"] = {
        "cpu": platform.processor() or _cpu_model(), "logical_cores": os.cpu_count(), "python": platform.python_version(),
        "gpu": None, "serve_threads": serve.threads, "max_batch_size": serve.max_batch_size,
        "max_latency_ms": serve.max_latency_ms,
        "note": "load generator, API process and engine process share the same cores; other jobs may run",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results["targets"], indent=2))
    return 0


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
