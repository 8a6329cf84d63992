"""The feedback loop's moving parts, shared by its end-to-end test and ``benchmarks/feedback_loop.py``: a data
folder holding part of a real train set, corrections sent over HTTP, and the ``retrain`` deployment run on a real
Prefect server and process worker."""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from pipeline.contract import NPZ_KEY, official_file_names
from pipeline.data import local_prefix, read_npz_array, write_npz
from tests.prefect_server import POOL, VENV_BIN, prefect_cli, wait_for_flow_run
from tests.support import background_process

RETRAIN = "retrain/retrain"


def split_train_set(source: Path, dest: Path, champion_per_class: int, pool_per_class: int) -> dict[str, np.ndarray]:
    """``dest``: the first ``champion_per_class`` train images of each class of ``source`` and all its test files
    (official layout); returns the next ``pool_per_class`` of each class (never in ``dest``) as the feedback pool."""
    prefix = local_prefix(source, None)
    names = official_file_names(prefix)
    images, labels = (read_npz_array(source / names[f"train_{kind}"]) for kind in ("images", "labels"))
    by_class = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    champion = np.sort(np.concatenate([rows[:champion_per_class] for rows in by_class]))
    pool = np.concatenate([rows[champion_per_class:champion_per_class + pool_per_class] for rows in by_class])
    dest.mkdir(parents=True, exist_ok=True)
    write_npz(dest / names["train_images"], {NPZ_KEY: images[champion]})
    write_npz(dest / names["train_labels"], {NPZ_KEY: labels[champion]})
    for key in ("test_images", "test_labels", "classmap"):
        (dest / names[key]).write_bytes((source / names[key]).read_bytes())
    return {"images": images[pool], "labels": labels[pool]}


def png(glyph: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(glyph, mode="L").save(out, format="PNG")
    return out.getvalue()


def send_corrections(client: httpx.Client, images: np.ndarray, labels: np.ndarray, version: str) -> list[int]:
    """POST /feedback once per image with its right label; the stored ids, in order."""
    ids = []
    for glyph, label in zip(images, labels, strict=True):
        answer = client.post("/feedback", files={"image": ("glyph.png", png(glyph), "image/png")},
                             data={"label": str(int(label)), "model_version": version})
        if answer.status_code != 201:
            raise AssertionError(f"feedback {len(ids)}: {answer.status_code} {answer.text}")
        ids.append(answer.json()["id"])
    return ids


def run_retrain(api_url: str, project: Path, env: dict[str, str], work: Path, timeout_s: float = 1800) -> tuple[
        dict, str]:
    """Deploy ``retrain`` from the project's prefect.yaml, run it on a process worker: (flow run, worker log)."""
    subprocess.run([str(VENV_BIN / "prefect"), "work-pool", "create", POOL, "--type", "process"], cwd=project,
                   env=env, capture_output=True, check=False)  # a shared server may have it already
    prefect_cli(["--no-prompt", "deploy", "--name", "retrain"], project, env)
    worker_log = work / "worker.log"
    with background_process([str(VENV_BIN / "prefect"), "worker", "start", "--pool", POOL], env=env, cwd=work,
                            log_path=worker_log):
        out = prefect_cli(["deployment", "run", RETRAIN], project, env)
        run = wait_for_flow_run(api_url, re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1), worker_log,
                                timeout_s)
    return run, worker_log.read_text(errors="replace")
