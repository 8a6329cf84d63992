"""Serving benchmark (CPU): the BentoML service against a lean anchor and the seed-style app, in one run.

    python -m benchmarks.serve [--duration 10] [--soak 60] [--out benchmarks/results/serve_cpu.json]
                               [--markdown benchmarks/SERVE.md] [--no-alternatives]

Load comes from ``wrk`` (a compiled load generator; Debian package ``wrk``) with ``benchmarks/wrk_post.lua``
posting a prepared multipart body; Python never times a request. In one run, with one random-weight
SpinalVGG (49 classes; speed does not depend on the weights):

(a) raw ONNX Runtime: batch-1 latency and batched throughput, at 1 and 2 intra-op threads;
(b) three servers started side by side, each on 127.0.0.1, measured in turn at each load point so that
    their ratios see the same machine: the service (``bentoml serve service:Kuzushiji``), the lean anchor
    (benchmarks/lean_server.py: one Starlette process, the same parsing, decoding and micro-batcher, no
    framework) and the seed-style app (benchmarks/fastapi_baseline.py: FastAPI, eager PyTorch per
    request); ``predict`` at 1, 32 and 64 connections;
(c) the service's ``predict_batch`` (32 images a request, 4 connections) against (a);
(d) the service at 64 connections for --soak seconds: every error wrk sees, and the RSS of all the
    service's processes at the start and the end;
(e) alternatives of the service at 32 connections (other thread and worker counts, BentoML's default
    tracing and access log), each followed at once by the lean anchor for its ratio.

Writes the JSON result and the generated part of benchmarks/SERVE.md (between its result markers).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psutil

from benchmarks.load import (
    BATCH_CONNECTIONS,
    BATCH_REQUEST_IMAGES,
    CONCURRENCY,
    SOAK_CONNECTIONS,
    WARMUP_SECONDS,
    build_model,
    cpu_model,
    glyph_png,
    lean_anchor,
    multipart_body,
    raw_engine,
    require_wrk,
    seed_style,
    service,
    tree_rss_mb,
    write_params,
    wrk,
)
from pipeline.config import load_settings
from pipeline.contract import CLASSMAP_FILE, META_FILE, ONNX_FILE
from tests.support import PROJECT_ROOT

RESULTS_BEGIN, RESULTS_END = (
    "<!-- benchmark results: begin (written by benchmarks/serve.py) -->",
    "<!-- benchmark results: end -->",
)
# Targets (issue 11), checked on ratios measured in the same run.
VS_LEAN_MIN, VS_SEED_MIN = 0.9, 2.0
P99_C32_MAX_MS, P99_C64_MAX_MS = 150.0, 300.0
P50_C1_VS_LEAN_MAX = 1.2
BATCH_VS_RAW_MIN = 0.8
RSS_GROWTH_MAX = 0.10  # "flat": the soak's end within 10% of its start


# ------------------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict[str, Any]:
    require_wrk()
    serve = load_settings().serve
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    weights = build_model(work)
    bento_env = {"BENTOML_HOME": str(work / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.stages.package",
            "store",
            "--onnx",
            str(work / ONNX_FILE),
            "--classmap",
            str(work / CLASSMAP_FILE),
            "--meta",
            str(work / META_FILE),
            "--registry-version",
            "0",
        ],
        cwd=PROJECT_ROOT,
        env={**os.environ, **bento_env},
        check=True,
        capture_output=True,
    )
    single = work / "single.body"
    single.write_bytes(multipart_body("image", [glyph_png()]))
    batch = work / "batch.body"
    batch.write_bytes(multipart_body("images", [glyph_png(seed) for seed in range(BATCH_REQUEST_IMAGES)]))
    results: dict[str, Any] = {"load_average_before": [round(x, 2) for x in os.getloadavg()]}

    print("raw engine ...", flush=True)
    results["raw_onnxruntime"] = {f"threads_{t}": raw_engine(work / ONNX_FILE, t) for t in (1, 2)}
    print(json.dumps(results["raw_onnxruntime"]), flush=True)

    servers: dict[str, dict[str, Any]] = {"service": {}, "lean_anchor": {}, "seed_style": {}}
    with ExitStack() as stack:
        urls = {
            "service": stack.enter_context(service(work, "service", bento_env)),
            "lean_anchor": stack.enter_context(lean_anchor(work, serve.threads)),
            "seed_style": stack.enter_context(seed_style(work, weights, serve.threads)),
        }
        for url, _ in urls.values():
            wrk(f"{url}/predict", single, 8, WARMUP_SECONDS)
        for connections in CONCURRENCY:  # each point measured on all three servers back to back
            for name, (url, _) in urls.items():
                point = wrk(f"{url}/predict", single, connections, args.duration)
                servers[name][f"predict_c{connections}"] = point
                print(name, json.dumps(point), flush=True)
        url, pid = urls["service"]
        point = wrk(f"{url}/predict_batch", batch, BATCH_CONNECTIONS, args.duration)
        point["images_s"] = round(point["requests_s"] * BATCH_REQUEST_IMAGES, 1)
        servers["service"][f"predict_batch{BATCH_REQUEST_IMAGES}_c{BATCH_CONNECTIONS}"] = point
        print("service predict_batch", json.dumps(point), flush=True)
        rss_start = tree_rss_mb(pid)
        soak = wrk(f"{url}/predict", single, SOAK_CONNECTIONS, args.soak)
        soak.update(rss_start_mb=rss_start, rss_end_mb=tree_rss_mb(pid))
        servers["service"]["soak_c64"] = soak
        print("service soak", json.dumps(soak), flush=True)
    results["servers"] = servers

    if args.alternatives:
        results["alternatives"] = alternatives(work, bento_env, single, batch, args.duration, serve.threads)
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    results["targets"] = targets(results, serve.threads)
    results["machine"] = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "python": platform.python_version(),
        "gpu": None,
        "serve_threads": serve.threads,
        "service_workers": f"workers=cpu_count ({psutil.cpu_count()})",
        "engine_max_batch": serve.engine_max_batch,
        "load_generator": "wrk, 1 thread, on the same cores as the servers",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    return results


def alternatives(
    work: Path, bento_env: dict[str, str], single: Path, batch: Path, seconds: float, threads: int
) -> dict[str, Any]:
    """Other ways to run the same service at 32 connections (and predict_batch), each measured right
    before the lean anchor so that its ratio to the anchor sees the same machine."""
    variants = {
        "workers=1 (one process, like the anchor)": {"BENTOML_CONFIG_OPTIONS": "services.kuzushiji.workers=1"},
        "workers=1, threads=2": {
            "KUZUSHIJI_PARAMS": str(write_params(work, "threads", threads=2 if threads == 1 else 1)),
            "BENTOML_CONFIG_OPTIONS": "services.kuzushiji.workers=1",
        },
        "BentoML's default tracing and access log": {
            "BENTOML_CONFIG_OPTIONS": "services.kuzushiji.logging.access.enabled=true "
            "services.kuzushiji.tracing.excluded_urls=/livez"
        },
    }
    measured = {}
    with lean_anchor(work, threads) as (lean_url, _):
        for name, extra in variants.items():
            with service(work, f"variant-{len(measured)}", {**bento_env, **extra}) as (url, _):
                wrk(f"{url}/predict", single, 8, WARMUP_SECONDS)
                point = wrk(f"{url}/predict", single, 32, seconds)
                batch_point = wrk(f"{url}/predict_batch", batch, BATCH_CONNECTIONS, seconds)
                lean = wrk(f"{lean_url}/predict", single, 32, seconds)
            point["predict_batch_images_s"] = round(batch_point["requests_s"] * BATCH_REQUEST_IMAGES, 1)
            point["lean_requests_s"] = lean["requests_s"]
            point["vs_lean"] = round(point["requests_s"] / lean["requests_s"], 3)
            measured[name] = point
            print("alternative", name, json.dumps(point), flush=True)
    return measured


def targets(results: dict[str, Any], threads: int) -> dict[str, Any]:
    service_points, lean, seed = (results["servers"][k] for k in ("service", "lean_anchor", "seed_style"))
    # The engine's limit on this machine: the best raw throughput at any thread count.
    raw = max(results["raw_onnxruntime"].values(), key=lambda engine: engine["best_throughput_img_s"])
    batch = service_points[f"predict_batch{BATCH_REQUEST_IMAGES}_c{BATCH_CONNECTIONS}"]
    soak = service_points["soak_c64"]
    checks = {
        "c32 throughput vs lean": (
            service_points["predict_c32"]["requests_s"] / lean["predict_c32"]["requests_s"],
            ">=",
            VS_LEAN_MIN,
        ),
        "c32 throughput vs seed-style": (
            service_points["predict_c32"]["requests_s"] / seed["predict_c32"]["requests_s"],
            ">=",
            VS_SEED_MIN,
        ),
        "c32 p99 ms": (service_points["predict_c32"]["p99_ms"], "<=", P99_C32_MAX_MS),
        "c64 throughput vs lean": (
            service_points["predict_c64"]["requests_s"] / lean["predict_c64"]["requests_s"],
            ">=",
            VS_LEAN_MIN,
        ),
        "c64 p99 ms": (service_points["predict_c64"]["p99_ms"], "<=", P99_C64_MAX_MS),
        "c1 p50 vs lean": (
            service_points["predict_c1"]["p50_ms"] / lean["predict_c1"]["p50_ms"],
            "<=",
            P50_C1_VS_LEAN_MAX,
        ),
        f"predict_batch vs raw engine (best: {raw['threads']} thread(s), batch {raw['best_batch']})": (
            batch["images_s"] / raw["best_throughput_img_s"],
            ">=",
            BATCH_VS_RAW_MIN,
        ),
        "soak errors (64 connections)": (soak["errors"], "<=", 0),
        "soak RSS growth": (
            (soak["rss_end_mb"] - soak["rss_start_mb"]) / soak["rss_start_mb"],
            "<=",
            RSS_GROWTH_MAX,
        ),
    }
    return {
        name: {
            "measured": round(value, 3),
            "target": f"{op} {limit}",
            "holds": value >= limit if op == ">=" else value <= limit,
        }
        for name, (value, op, limit) in checks.items()
    }


# ------------------------------------------------------------------------------------- report


def markdown(results: dict[str, Any]) -> str:
    machine, servers = results["machine"], results["servers"]
    lines = [
        (
            f"Run of {machine['date']}: {machine['cpu']}, {machine['logical_cores']} logical cores, no GPU; "
            f"{machine['load_generator']}; load average {results['load_average_before']} before, "
            f"{results['load_average_after']} after (other engineers' jobs share this machine)."
        ),
        "",
        "| server | 1 connection | 32 connections | 64 connections |",
        "|---|---|---|---|",
    ]
    labels = {
        "service": "service (`bentoml serve service:Kuzushiji`)",
        "lean_anchor": "lean anchor (Starlette, same parsing + micro-batcher, no framework)",
        "seed_style": "seed-style (FastAPI, eager PyTorch per request)",
    }
    for name, label in labels.items():
        cells = []
        for connections in CONCURRENCY:
            point = servers[name][f"predict_c{connections}"]
            errors = f", **{point['errors']} errors**" if point["errors"] else ""
            cells.append(
                f"{point['requests_s']:.0f} req/s, p50 {point['p50_ms']:.1f} ms, p99 {point['p99_ms']:.1f} ms{errors}"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    raw = results["raw_onnxruntime"]
    batch = servers["service"][f"predict_batch{BATCH_REQUEST_IMAGES}_c{BATCH_CONNECTIONS}"]
    soak = servers["service"]["soak_c64"]
    lines += [
        "",
        "| measurement | result |",
        "|---|---|",
    ]
    for engine in raw.values():
        lines.append(
            f"| raw ONNX Runtime, {engine['threads']} thread(s) | batch 1 p50 "
            f"{engine['batch1_p50_ms']:.2f} ms; best {engine['best_throughput_img_s']:.0f} img/s "
            f"(batch {engine['best_batch']}) |"
        )
    error_kinds = ", ".join(f"{kind} {count}" for kind, count in soak["error_kinds"].items())
    lines += [
        (
            f"| service `predict_batch`, {BATCH_REQUEST_IMAGES} images a request, {BATCH_CONNECTIONS} "
            f"connections | {batch['images_s']:.0f} img/s, p50 {batch['p50_ms']:.1f} ms, "
            f"p99 {batch['p99_ms']:.1f} ms |"
        ),
        (
            f"| soak: service `predict`, {SOAK_CONNECTIONS} connections, {soak['seconds']:.0f} s | "
            f"{soak['requests']:,} requests, {soak['requests_s']:.0f} req/s, p99 {soak['p99_ms']:.1f} ms, "
            f"**{soak['errors']} errors** ({error_kinds}); RSS {soak['rss_start_mb']} MB -> "
            f"{soak['rss_end_mb']} MB |"
        ),
    ]
    if "alternatives" in results:
        lines += [
            "",
            "Alternatives of the service at 32 connections, each followed at once by the lean anchor:",
            "",
            "| variant | predict | vs lean anchor | predict_batch |",
            "|---|---|---|---|",
        ]
        default = servers["service"]["predict_c32"]
        lines.append(
            f"| as committed ({machine['service_workers']}, threads={machine['serve_threads']}) | "
            f"{default['requests_s']:.0f} req/s, p99 {default['p99_ms']:.1f} ms | "
            f"{results['targets']['c32 throughput vs lean']['measured']} (side by side above) | "
            f"{batch['images_s']:.0f} img/s |"
        )
        for name, point in results["alternatives"].items():
            lines.append(
                f"| {name} | {point['requests_s']:.0f} req/s, p99 {point['p99_ms']:.1f} ms | "
                f"{point['vs_lean']} ({point['lean_requests_s']:.0f} req/s) | "
                f"{point['predict_batch_images_s']:.0f} img/s |"
            )
    lines += ["", "| target | measured | holds? |", "|---|---|---|"]
    for name, target in results["targets"].items():
        lines.append(f"| {name} {target['target']} | {target['measured']} | {'yes' if target['holds'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, table: str) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else f"{RESULTS_BEGIN}\n{RESULTS_END}\n"
    if RESULTS_BEGIN not in text or RESULTS_END not in text:
        text += f"\n{RESULTS_BEGIN}\n{RESULTS_END}\n"
    head, rest = text.split(RESULTS_BEGIN, 1)
    _, tail = rest.split(RESULTS_END, 1)
    path.write_text(f"{head}{RESULTS_BEGIN}\n{table}{RESULTS_END}{tail}", encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load point")
    parser.add_argument("--soak", type=float, default=60.0, help="seconds of the 64-connection soak")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "serve_cpu.json")
    parser.add_argument("--markdown", type=Path, default=PROJECT_ROOT / "benchmarks" / "SERVE.md")
    parser.add_argument("--no-alternatives", dest="alternatives", action="store_false")
    args = parser.parse_args()
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    write_markdown(args.markdown, markdown(results))
    print(json.dumps(results["targets"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
