"""The serving container for real: ``scripts/container_smoke.sh`` builds the bento and its image with
``bentoml containerize --backend podman``, runs it on loopback and checks ``/predict`` and
``/predict_batch`` answers against the same model run in this process's environment.

The model is a small SpinalVGG trained here on rendered K49 characters and put into a BentoML store in a
temp dir (``pipeline.stages.package store``), so the test needs no pipeline run. On hosts that cannot pull public
images (the project's CI) set ``KUZUSHIJI_RESTRICTED_HOST=1``: the script then builds on a Debian base made
with debootstrap (cached in podman's store between runs), see docs/CONTAINER.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.support import PROJECT_ROOT

needs_podman = pytest.mark.skipif(
    shutil.which("podman") is None,
    reason="podman is not installed (apt-get install -y podman runc debootstrap)",
)

SCRIPT = PROJECT_ROOT / "scripts" / "container_smoke.sh"
CHECKER = PROJECT_ROOT / "scripts" / "container_check.py"
TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 2  # a real, if weak, model: the check compares its outputs, not accuracy
EPOCHS = 1
REGISTRY_VERSION = "7"  # recorded with the stored model; the service must report it back
SMOKE_TIMEOUT_S = 900  # first run on a fresh machine: debootstrap base + uncached image build (~5 min)
CONTAINER_PREFIX = "kuzushiji-smoke-"
CLEANUP_TIMEOUT_S = 120  # the script's trap: stop (10 s grace) and remove the container


def _store_env(home: Path) -> dict[str, str]:
    return {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}


def _run_script(args: list[str], env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess:
    """Run the smoke script; on timeout send SIGTERM (not SIGKILL) so its trap removes the container."""
    process = subprocess.Popen([str(SCRIPT), *args], cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=CLEANUP_TIMEOUT_S)
        pytest.fail(f"smoke script ran over {timeout_s:.0f}s:\n{stdout[-3000:]}\n{stderr[-8000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture
def model_store(make_settings, tmp_path: Path) -> tuple[Path, str]:
    """A BentoML store (temp dir) holding a SpinalVGG trained briefly on rendered K49 characters."""
    from pipeline.contract import write_classmap
    from pipeline.data import OFFICIAL_CLASSMAPS, LabeledImages
    from pipeline.export import export_onnx
    from pipeline.synthetic import render_glyph
    from pipeline.training.loop import fit

    settings = make_settings({"train.epochs": EPOCHS, "train.device": "cpu"})
    classmap = OFFICIAL_CLASSMAPS["k49"]
    rng = np.random.default_rng(settings.seed)

    def split(per_class: int) -> LabeledImages:
        labels = np.repeat(np.arange(len(classmap), dtype=np.int64), per_class)
        return LabeledImages(np.stack([render_glyph(classmap.chars[i], rng) for i in labels]), labels)

    train, val = split(TRAIN_PER_CLASS), split(VAL_PER_CLASS)
    pixels = train.images / 255.0
    result = fit(settings, train, val, len(classmap), float(pixels.mean()), float(pixels.std()))

    models = tmp_path / "model"
    onnx = export_onnx(result.model, models / "model.onnx", val.images[:8].astype(np.float32)[:, None])
    classmap_csv = write_classmap(classmap, models / "classmap.csv")
    meta = models / "meta.json"
    meta.write_text(json.dumps({"dataset": "synthetic", "run_id": "container-test"}), encoding="utf-8")

    home = tmp_path / "bentoml"  # outside the bento build context (the project root)
    stored = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.package", "store", "--onnx", str(onnx),
         "--classmap", str(classmap_csv), "--meta", str(meta), "--registry-version", REGISTRY_VERSION],
        cwd=PROJECT_ROOT, env=_store_env(home), capture_output=True, text=True, timeout=300,
    )
    assert stored.returncode == 0, stored.stderr[-3000:]
    return home, stored.stdout.strip().splitlines()[-1]


def _leftover_containers() -> list[str]:
    names = subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True,
                           env=os.environ, check=True).stdout.split()
    return [name for name in names if name.startswith(CONTAINER_PREFIX)]


@pytest.mark.container
@pytest.mark.slow
@needs_podman
@pytest.mark.timeout(SMOKE_TIMEOUT_S + 300)  # + training the small model
def test_container_builds_serves_and_answers(model_store: tuple[Path, str], tmp_path: Path) -> None:
    home, tag = model_store
    report = tmp_path / "container.json"
    before = set(_leftover_containers())
    smoke = _run_script(["--model", tag, "--report", str(report), "--remove-image"], _store_env(home),
                        SMOKE_TIMEOUT_S)
    assert smoke.returncode == 0, f"smoke script failed:\n{smoke.stdout[-3000:]}\n{smoke.stderr[-8000:]}"

    result = json.loads(report.read_text(encoding="utf-8"))
    assert result["model"] == tag
    assert result["check"]["model"] == tag
    assert result["check"]["model_version"] == REGISTRY_VERSION
    assert len(result["check"]["batch_top1"]) == len(result["check"]["chars"])
    assert result["image_size_bytes"] > 0 and result["time_to_ready_s"] > 0
    # The trap stopped and removed the container, and --remove-image removed the image.
    assert set(_leftover_containers()) <= before
    inspect = subprocess.run(["podman", "image", "exists", result["image"]], env=os.environ)
    assert inspect.returncode == 1


@pytest.mark.container
@needs_podman
def test_container_script_refuses_an_empty_store(tmp_path: Path) -> None:
    """No model in the store: a clear error before any build, and nothing left behind."""
    smoke = _run_script([], _store_env(tmp_path / "empty-store"), timeout_s=300)
    assert smoke.returncode != 0
    assert "is not in the store" in smoke.stderr
    assert "make run DATASET=synthetic" in smoke.stderr


def _checker():
    spec = importlib.util.spec_from_file_location("container_check", CHECKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Classes:
    classes = [("U+3042", "あ"), ("U+3044", "い"), ("U+3046", "う")]


def test_checker_accepts_a_true_top_k_and_rejects_wrong_answers() -> None:
    """The answer check itself can fail: order, probabilities, class names and left-out classes."""
    check = _checker()
    expected = np.array([0.2, 0.7, 0.1])
    good = [{"index": 1, "char": "い", "codepoint": "U+3044", "reading": "i", "probability": 0.7},
            {"index": 0, "char": "あ", "codepoint": "U+3042", "reading": "a", "probability": 0.2}]
    check.check_predictions("ok", good, expected, _Classes(), top_k=2)
    wrong = {
        "order": good[::-1],
        "probability": [{**good[0], "probability": 0.6}, good[1]],
        "class name": [{**good[0], "char": "あ"}, good[1]],
        "not the top-k": [good[0], {"index": 2, "char": "う", "codepoint": "U+3046", "reading": "u",
                                    "probability": 0.1}],
        "length": good[:1],
    }
    for what, answer in wrong.items():
        with pytest.raises(check.CheckFailed):
            check.check_predictions(what, answer, expected, _Classes(), top_k=2)


def test_derived_bentofile_only_sets_the_base_image(tmp_path: Path) -> None:
    import yaml

    bentofile = PROJECT_ROOT / "bentofile.yaml"
    out = _checker().derive_bentofile(bentofile, "localhost/base:1", tmp_path / "b.yaml")
    original = yaml.safe_load(bentofile.read_text(encoding="utf-8"))
    derived = yaml.safe_load(out.read_text(encoding="utf-8"))
    assert derived["docker"].pop("base_image") == "localhost/base:1"
    original["docker"].pop("base_image", None)
    assert derived == original
