"""Swapping the model under load (issue 23): ``predict`` latency before, during and after ``POST /admin/reload``.

    python -m benchmarks.swap [--seconds 6] [--swaps 3] [--connections 32]
                              [--out benchmarks/results/serve_swap.json] [--markdown benchmarks/SERVE.md]

The service (``bentoml serve``, workers=cpu_count, params.yaml's serve settings) serves a random-weight
SpinalVGG (49 classes) from a temporary BentoML store. ``wrk`` (benchmarks/wrk_post.lua) loads ``/predict``
in windows of --seconds: one before, one per swap (a new version is stored between windows, and the reload
is sent a third of the way into the window), one after. Also measured: the reload's answer time, how long
until every worker serves the new version (from the ``kuzushiji_served_model`` gauge), and in-process what
one look costs a worker: a stat of the reload marker against a resolve of the store's champion tag.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.load import (
    build_model,
    cpu_model,
    glyph_png,
    multipart_body,
    require_wrk,
    service,
    write_params,
    wrk,
)
from pipeline.config import load_settings
from tests.served_model import store_bundle

TOKEN = "benchmark-admin-token-0123456789abcdef"
WARMUP_SECONDS = 3
LOOKS = 2000
RESULTS_BEGIN, RESULTS_END = (
    "<!-- swap results: begin (written by benchmarks/swap.py) -->",
    "<!-- swap results: end -->",
)


def served_versions(client: httpx.Client) -> dict[str, int]:
    """registry version -> how many workers serve it (their kuzushiji_served_model gauge is 1)."""
    counts: dict[str, int] = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("kuzushiji_served_model{") and line.endswith(" 1.0"):
            version = dict(re.findall(r'(\w+)="([^"]*)"', line))["registry_version"]
            counts[version] = counts.get(version, 0) + 1
    return counts


def swap_under_load(url: str, body: Path, connections: int, seconds: float, version: str,
                    workers: int) -> dict[str, Any]:
    """One wrk window with a reload a third of the way in; the reload's timings ride along."""
    require_wrk()
    load: dict[str, Any] = {}
    generator = threading.Thread(target=lambda: load.update(wrk(f"{url}/predict", body, connections, seconds)))
    generator.start()
    time.sleep(seconds / 3)
    with httpx.Client(base_url=url, timeout=60.0) as client:
        started = time.perf_counter()
        answer = client.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
        answered = time.perf_counter() - started
        while served_versions(client) != {version: workers} and time.perf_counter() - started < seconds:
            time.sleep(0.02)
        everywhere = time.perf_counter() - started
    generator.join()
    return {**load, "reload_status": answer.status_code, "reload_answer_ms": round(1000 * answered, 1),
            "all_workers_swapped_ms": round(1000 * everywhere, 1),
            "swapped_to": answer.json().get("model", {}).get("registry_version")}


def look_costs(work: Path, name: str) -> dict[str, float]:
    """What one look costs a worker, in microseconds: the marker's stat, and a resolve of the champion tag."""
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models.model import ModelStore

    from pipeline.contract import recorded_bento_tag
    from serving.model_holder import _marker_tag, stored_model

    marker = work / "marker"
    marker.write_text(json.dumps({"tag": f"{name}:x"}), encoding="utf-8")
    seen = _marker_tag(marker, None)[1]
    started = time.perf_counter()
    for _ in range(LOOKS):
        _marker_tag(marker, seen)
    marker_us = (time.perf_counter() - started) / LOOKS * 1e6
    BentoMLContainer.model_store.set(ModelStore(str(work / "bentoml" / "models")))
    try:
        started = time.perf_counter()
        for _ in range(LOOKS // 10):
            recorded_bento_tag(work)
            stored_model(f"{name}:latest")
        store_us = (time.perf_counter() - started) / (LOOKS // 10) * 1e6
    finally:
        BentoMLContainer.model_store.reset()
    return {"marker_stat_us": round(marker_us, 2), "store_resolve_us": round(store_us, 1)}


def busy_processes() -> list[str]:
    """The other processes using the cores while the benchmark starts (a 1 s sample)."""
    processes = list(psutil.process_iter(["name", "cmdline"]))
    for process in processes:
        try:
            process.cpu_percent(None)
        except psutil.Error:
            continue
    time.sleep(1.0)
    busy = []
    for process in processes:
        try:
            share = process.cpu_percent(None)
        except psutil.Error:
            continue
        if share >= 5 and process.pid != os.getpid():
            command = " ".join(process.info["cmdline"] or [process.info["name"] or "?"])[:80]
            busy.append(f"{share:.0f}% {command}")
    return sorted(busy, key=lambda item: -float(item.split("%")[0]))[:6]


def run(args: argparse.Namespace) -> dict[str, Any]:
    serve = load_settings().serve
    work = Path(tempfile.mkdtemp(prefix="swap-bench-"))
    build_model(work)
    params = write_params(work, "swap")
    env = {"BENTOML_HOME": str(work / "bentoml"), "BENTOML_DO_NOT_TRACK": "True", "KUZUSHIJI_PARAMS": str(params),
           "KUZUSHIJI_ADMIN_TOKEN": TOKEN}
    store_bundle(work, "1", env)
    body = work / "single.body"
    body.write_bytes(multipart_body("image", [glyph_png()]))
    workers = psutil.cpu_count() or 1
    results: dict[str, Any] = {"load_average_before": [round(x, 2) for x in os.getloadavg()],
                               "busy_processes_before": busy_processes()}
    windows: list[dict[str, Any]] = []
    with service(work, "swap", env) as (url, _):
        wrk(f"{url}/predict", body, 8, WARMUP_SECONDS)
        windows.append({"phase": "before", **wrk(f"{url}/predict", body, args.connections, args.seconds)})
        for swap in range(args.swaps):
            version = str(swap + 2)
            store_bundle(work, version, env)  # outside the windows: a new champion in the store
            point = swap_under_load(url, body, args.connections, args.seconds, version, workers)
            windows.append({"phase": f"during swap {swap + 1}", **point})
        windows.append({"phase": "after", **wrk(f"{url}/predict", body, args.connections, args.seconds)})
    for window in windows:
        print(json.dumps(window), flush=True)
    during = [w for w in windows if w["phase"].startswith("during")]
    results.update({
        "windows": windows,
        "summary": {
            "errors_total": sum(w["errors"] for w in windows),
            "p99_ms_before": windows[0]["p99_ms"],
            "p99_ms_during_median": statistics.median(w["p99_ms"] for w in during),
            "p99_ms_after": windows[-1]["p99_ms"],
            "all_workers_swapped_ms_median": statistics.median(w["all_workers_swapped_ms"] for w in during),
        },
        "look_costs": look_costs(work, serve.bento_model),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "machine": {
            "cpu": cpu_model(), "logical_cores": os.cpu_count(), "service_workers": workers,
            "serve_threads": serve.threads, "reload_follow_s": serve.reload_follow_s,
            "connections": args.connections, "window_seconds": args.seconds,
            "load_generator": "wrk, 1 thread, on the same cores as the server; everything under nice -n 19",
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        },
    })
    return results


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        RESULTS_BEGIN,
        f"Measured {machine['date']} on {machine['cpu']} ({machine['logical_cores']} logical cores), "
        f"{machine['service_workers']} workers, {machine['connections']} connections, windows of "
        f"{machine['window_seconds']} s; load average {results['load_average_before']} before, "
        f"{results['load_average_after']} after; busy at the start: "
        f"{'; '.join(results['busy_processes_before']) or 'nothing else'}.",
        "",
        "| window | requests/s | p50 ms | p99 ms | max ms | errors | reload answered ms | all workers swapped ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w in results["windows"]:
        lines.append(f"| {w['phase']} | {w['requests_s']} | {w['p50_ms']} | {w['p99_ms']} | {w['max_ms']} | "
                     f"{w['errors']} | {w.get('reload_answer_ms', '')} | {w.get('all_workers_swapped_ms', '')} |")
    costs = results["look_costs"]
    lines += ["", f"One look by a worker: a stat of the reload marker {costs['marker_stat_us']} µs; a resolve of "
              f"the store's champion tag {costs['store_resolve_us']} µs.", RESULTS_END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--swaps", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_swap.json"))
    parser.add_argument("--markdown", type=Path, default=None, help="rewrite the swap results block of this file")
    args = parser.parse_args()
    results = run(args)
    args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    block = markdown(results)
    if args.markdown:
        text = args.markdown.read_text(encoding="utf-8")
        start, end = text.find(RESULTS_BEGIN), text.find(RESULTS_END)
        if start < 0 or end < 0:
            raise SystemExit(f"{args.markdown}: no swap results markers; add {RESULTS_BEGIN!r} ... {RESULTS_END!r}")
        args.markdown.write_text(text[:start] + block + text[end + len(RESULTS_END):], encoding="utf-8")
    print(block)


if __name__ == "__main__":
    main()
