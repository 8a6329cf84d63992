"""A real `bentoml serve` on 127.0.0.1 serving a SpinalVGG trained seconds on rendered glyphs.

Shared by the service tests (HTTP) and the page tests (a browser): the model is trained, exported to ONNX,
imported into a BentoML store under the given folder (BENTOML_HOME) with ``python -m pipeline.stages.package store``
and served on a free port; the server is always stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import yaml

from pipeline.contract import TRUST_KEY
from pipeline.data import OFFICIAL_CLASSMAPS
from pipeline.export import export_onnx
from pipeline.model import SpinalVGG
from pipeline.synthetic import render_glyph
from pipeline.training.bundle import predict_logits
from pipeline.trust.calibration import TrustFit, fit_trust
from tests.support import PROJECT_ROOT, background_process, free_port

TRAIN_CLASSES = 10  # the first K49 classes: あ い う え お か き く け こ
PER_CLASS = 40
VAL_PER_CLASS = 20  # rendered glyphs the temperature and thresholds are fitted on
EPOCHS = 5
REGISTRY_VERSION = "7"  # what /version and X-Model-Version must report
# The limits of the one server the service and page tests share (tests/conftest.py): small, so that
# each limit is cheap to reach, and short timeouts, so that a test of one waits a second, not minutes.
SHARED_LIMITS = {
    "top_k": 3,
    "max_images_per_request": 8,
    "max_upload_bytes": 1_000_000,
    "max_request_bytes": 3_000_000,  # below 8 x 1 MB: the body cap binds first
    "max_pixels_per_request": 20_000_000,
    "worker_body_budget_bytes": 8_000_000,  # one 3 MB body (held twice) at a time, the rest queue ...
    "queue_timeout_s": 0.5,  # ... half a second, then 503
    "body_idle_timeout_s": 1.0,
    "header_timeout_s": 2.0,
    "max_header_bytes": 16_384,
    "max_headers": 50,
}
# Feedback writes of the shared server: an allowance per client address that the tests on 127.0.0.1 stay
# within, and that the rate test (from an address of its own) reaches in a few requests.
SHARED_FEEDBACK = {"rate_burst": 12, "rate_per_minute": 6}


def train_tiny_model(out: Path) -> list[str]:
    """A SpinalVGG fitted for a few seconds on rendered glyphs; writes the three serving files."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    chars = list(OFFICIAL_CLASSMAPS["k49"].chars[:TRAIN_CLASSES])
    codepoints = list(OFFICIAL_CLASSMAPS["k49"].codepoints[:TRAIN_CLASSES])
    labels = np.repeat(np.arange(TRAIN_CLASSES), PER_CLASS)
    images = np.stack([render_glyph(chars[label], rng) for label in labels])
    x = torch.from_numpy(images.astype(np.float32)[:, None])
    y = torch.from_numpy(labels)
    mean, std = float(x.mean() / 255), float(x.std() / 255)
    model = SpinalVGG(TRAIN_CLASSES, spinal_width=32, dropout=0.1, pixel_mean=mean, pixel_std=std)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(EPOCHS):
        model.train()
        for batch in torch.randperm(len(y)).split(32):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()
    trust = _calibrate(model, chars, rng)
    export_onnx(model, out / "model.onnx", images[:4].astype(np.float32)[:, None])
    rows = [f"{i},{cp},{ch}" for i, (cp, ch) in enumerate(zip(codepoints, chars, strict=True))]
    (out / "classmap.csv").write_text("index,codepoint,char\n" + "\n".join(rows) + "\n", encoding="utf-8")
    meta = {"dataset": "synthetic", "run_id": "test", TRUST_KEY: trust.as_meta()}
    (out / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return chars


def store_bundle(folder: Path, registry_version: str, env: dict[str, str]) -> str:
    """``folder``'s model.onnx, classmap.csv and meta.json into the store of ``env`` (BENTOML_HOME); the tag."""
    store = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.package", "store", "--onnx", str(folder / "model.onnx"),
         "--classmap", str(folder / "classmap.csv"), "--meta", str(folder / "meta.json"),
         "--registry-version", registry_version],
        cwd=PROJECT_ROOT, env={**os.environ, **env}, capture_output=True, text=True, check=True,
    )
    return store.stdout.strip().splitlines()[-1]


def _calibrate(model: SpinalVGG, chars: list[str], rng: np.random.Generator) -> TrustFit:
    """Temperature and thresholds fitted on freshly rendered glyphs (the pipeline's fit), baked in."""
    labels = np.repeat(np.arange(TRAIN_CLASSES), VAL_PER_CLASS)
    images = np.stack([render_glyph(chars[label], rng) for label in labels])
    logits = predict_logits(model, images, batch_size=256)
    trust = fit_trust(logits, labels, answered_accuracy=0.995, ood_false_alarm=0.01)
    model.calibrate(trust.temperature)
    return trust


@contextmanager
def serve_tiny_model(work: Path, serve_overrides: dict[str, Any] | None = None,
                     workers: int | None = None, extra_env: dict[str, str] | None = None,
                     feedback_overrides: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Train, store and serve the tiny model; yields client, url, port, chars, tag, process, env and work.

    ``serve_overrides`` (``feedback_overrides``) replace keys of params.yaml's ``serve:`` (``feedback:``) section
    for this server only; its feedback store is ``work/stores/feedback/feedback.db``; ``extra_env`` is added to
    the server's environment.
    """
    chars = train_tiny_model(work)
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["serve"].update(serve_overrides or {})
    params["feedback"].update(feedback_overrides or {})
    (work / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    env = {"BENTOML_HOME": str(work / "bentoml"), "KUZUSHIJI_PARAMS": str(work / "params.yaml"),
           "BENTOML_DO_NOT_TRACK": "True"}
    if workers is not None:
        env["BENTOML_CONFIG_OPTIONS"] = f"services.kuzushiji.workers={workers}"
    tag = store_bundle(work, REGISTRY_VERSION, env)
    env.update(extra_env or {})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bentoml_cli = str(Path(sys.executable).with_name("bentoml"))
    with background_process(
        [bentoml_cli, "serve", "service:Kuzushiji", "--host", "127.0.0.1", "--port", str(port)],
        ready_url=f"{url}/readyz", env=env, cwd=PROJECT_ROOT, log_path=work / "serve.log",
    ) as process, httpx.Client(base_url=url, timeout=60.0) as client:
        yield {"client": client, "url": url, "port": port, "chars": chars, "tag": tag, "process": process, "env": env,
               "work": work}
