"""What test-time views cost when served: the same service with one view and with model.tta_rotations_deg.

    python -m benchmarks.serve_tta [--rotations -6 0 6] [--duration 10] [--out benchmarks/results/serve_tta.json]

One random-weight SpinalVGG (49 classes) exported twice, without views and with them (the views are in the
ONNX graph, as the train stage exports them); each stored in its own BentoML store and served by ``bentoml
serve service:Kuzushiji``. Measured back to back at each load point with ``wrk`` (benchmarks/load.py's
helpers): raw ONNX Runtime, ``predict`` at 1 and 32 connections, ``predict_batch`` of 32 images.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.load import (
    BATCH_CONNECTIONS,
    BATCH_REQUEST_IMAGES,
    NUM_CLASSES,
    WARMUP_SECONDS,
    cpu_model,
    glyph_png,
    multipart_body,
    raw_engine,
    service,
    wrk,
)
from pipeline.contract import CLASSMAP_FILE, META_FILE, ONNX_FILE
from tests.support import PROJECT_ROOT

CONNECTIONS = (1, 32)


def stored_model(work: Path, name: str, rotations: list[float]) -> tuple[Path, dict[str, str]]:
    """The random-weight model with ``rotations`` as its views, exported and put in its own BentoML store:
    (the ONNX file, the environment that serves it)."""
    import torch

    from pipeline.data import OFFICIAL_CLASSMAPS
    from pipeline.export import export_onnx
    from pipeline.model import SpinalVGG

    folder = work / name
    folder.mkdir()
    torch.manual_seed(0)
    model = SpinalVGG(NUM_CLASSES).eval().set_views(rotations)
    example = np.random.default_rng(0).integers(0, 256, (4, 1, 28, 28)).astype(np.float32)
    export_onnx(model, folder / ONNX_FILE, example)
    classmap = OFFICIAL_CLASSMAPS["k49"]
    rows = [f"{i},{cp},{ch}" for i, (cp, ch) in enumerate(zip(classmap.codepoints, classmap.chars, strict=True))]
    (folder / CLASSMAP_FILE).write_text("index,codepoint,char\n" + "\n".join(rows) + "\n", encoding="utf-8")
    meta = {"dataset": "benchmark", "run_id": None, "tta_rotations_deg": rotations}
    (folder / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
    env = {"BENTOML_HOME": str(folder / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    subprocess.run([sys.executable, "-m", "pipeline.stages.package", "store", "--onnx", str(folder / ONNX_FILE),
                    "--classmap", str(folder / CLASSMAP_FILE), "--meta", str(folder / META_FILE),
                    "--registry-version", "0"], cwd=PROJECT_ROOT, env={**os.environ, **env}, check=True,
                   capture_output=True)
    return folder / ONNX_FILE, env


def run(rotations: list[float], seconds: float) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="serve-tta-"))
    models = {"one_view": stored_model(work, "one_view", []), "tta": stored_model(work, "tta", rotations)}
    single, batch = work / "single.body", work / "batch.body"
    single.write_bytes(multipart_body("image", [glyph_png()]))
    batch.write_bytes(multipart_body("images", [glyph_png(seed) for seed in range(BATCH_REQUEST_IMAGES)]))
    results: dict[str, Any] = {"rotations_deg": rotations, "load_average_before": list(os.getloadavg())}
    results["raw_onnxruntime"] = {name: {f"threads_{t}": raw_engine(path, t) for t in (1, 2)}
                                  for name, (path, _) in models.items()}
    points: dict[str, dict[str, Any]] = {name: {} for name in models}
    with service(work, "one_view", models["one_view"][1]) as (plain_url, _), \
            service(work, "tta", models["tta"][1]) as (tta_url, _):
        urls = {"one_view": plain_url, "tta": tta_url}
        for url in urls.values():
            wrk(f"{url}/predict", single, 8, WARMUP_SECONDS)
        for connections in CONNECTIONS:  # each point on both servers back to back
            for name, url in urls.items():
                points[name][f"predict_c{connections}"] = wrk(f"{url}/predict", single, connections, seconds)
        for name, url in urls.items():
            point = wrk(f"{url}/predict_batch", batch, BATCH_CONNECTIONS, seconds)
            point["images_s"] = round(point["requests_s"] * BATCH_REQUEST_IMAGES, 1)
            points[name][f"predict_batch{BATCH_REQUEST_IMAGES}_c{BATCH_CONNECTIONS}"] = point
    results["servers"] = points
    tta, one = points["tta"], points["one_view"]
    results["tta_vs_one_view"] = {key: round(tta[key]["requests_s"] / one[key]["requests_s"], 3) for key in tta}
    results["load_average_after"] = list(os.getloadavg())
    results["machine"] = {"cpu": cpu_model(), "logical_cores": os.cpu_count(),
                          "load_generator": "wrk, 1 thread, on the same cores as the servers"}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rotations", type=float, nargs="+", default=[-6.0, 0.0, 6.0], metavar="DEG")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load point")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "serve_tta.json")
    args = parser.parse_args()
    results = run(args.rotations, args.duration)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"tta_vs_one_view": results["tta_vs_one_view"], "raw": results["raw_onnxruntime"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
