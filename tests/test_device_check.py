"""The GPU check's proof without a GPU: its entry points run on the CPU with tiny sizes, importing only what the
GPU machine's image holds plus the carried wheels (benchmarks/device_guard.py), so a missing package fails here."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import device_guard
from benchmarks.device_check import prepare
from tests.support import PROJECT_ROOT

KMNIST_DEV = PROJECT_ROOT.parent / "shared" / "data" / "kmnist-dev"


def _guarded(*args: str, cwd: Path = PROJECT_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "benchmarks.device_guard", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_the_carried_wheels_are_the_lock_s_versions_and_cover_their_own_needs() -> None:
    carried = device_guard.carried_wheels()
    available = device_guard.IMAGE_DISTRIBUTIONS | set(carried)
    for name, version in carried.items():
        assert importlib.metadata.version(name) == version, name  # the versions the tests here run with
        for requirement in importlib.metadata.requires(name) or []:
            if "extra ==" in requirement:
                continue
            needed = device_guard.normalize(requirement.split(";")[0].split("[")[0].split(">")[0].split("=")[0]
                                            .split("<")[0].strip())
            assert needed in available, f"{name} needs {needed}: add it to {device_guard.WHEELS_FILE.name}"


def test_the_guard_refuses_what_the_image_lacks(tmp_path: Path) -> None:
    done = _guarded("pipeline.stages.tune")  # Optuna: the tuning stage is no part of the check
    assert done.returncode != 0 and "'optuna'" in done.stderr and "not on the GPU machine's image" in done.stderr
    no_wheels = tmp_path / "none.txt"
    no_wheels.write_text("# nothing carried\n", encoding="utf-8")
    done = _guarded("--wheels", str(no_wheels), "pipeline.config", "--help")
    assert done.returncode != 0 and "'pydantic'" in done.stderr
    done = _guarded("pipeline.config", "--check")  # Hydra composes conf/ here; the check reads params.yaml
    assert done.returncode != 0 and "'hydra'" in done.stderr
    done = _guarded("benchmarks.device_check", "--help")
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(not KMNIST_DEV.is_dir() and not os.environ.get("CI"), reason=f"no real data at {KMNIST_DEV}")
def test_the_dry_run_runs_every_entry_point_of_the_check(tmp_path: Path) -> None:
    data = prepare(KMNIST_DEV, tmp_path / "kmnist-dev")
    assert not (data / "data" / "raw" / "kmnist-train-imgs.npz").exists()  # the prepared split carries them
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE_DATA": str(data)}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", str(out)], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    variants = json.loads((out / "train_throughput_dry_run_variants.json").read_text(encoding="utf-8"))
    assert set(variants["variants"]) == {"bf16+cl", "fp32"}
    overhead = json.loads((out / "train_throughput_dry_run.json").read_text(encoding="utf-8"))
    assert overhead["full_pipeline_images_per_s"] > 0
    recipe = json.loads((out / "device_check_dry_run.json").read_text(encoding="utf-8"))
    pipeline = recipe["pipeline_full_recipe"]
    assert pipeline["epochs"] == 1 and pipeline["refit"] and pipeline["n_test"] == 100
    assert 0.0 <= pipeline["test_balanced_accuracy"] <= 1.0 and len(pipeline["epoch_seconds"]) == 2
    assert recipe["plain_loop"]["epochs_run"] == 1
    assert (out / "gpu_check.log").read_text(encoding="utf-8").count("== ") >= 4
