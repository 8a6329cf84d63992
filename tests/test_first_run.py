"""What `make run` decides and says before and after the pipeline (fast; no server, no training): the
profile for this machine, the CPU time estimate of a stage, the closing summary, the stage table, and which
Prefect API a run uses."""

from __future__ import annotations

import json
import tempfile
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from flows.tasks import STAGE_FUNCTIONS, STAGES
from launcher import server
from launcher import summary as run_summary
from pipeline import profiles as profile_choice
from pipeline.config import TrainSettings, load_settings, write_params
from tests.support import PROJECT_ROOT

KMNIST_DEV = PROJECT_ROOT.parent / "shared" / "data" / "kmnist-dev"

NO_GPU = (False, "no nvidia-smi on PATH")
GPU = (True, "GPU 0: NVIDIA H100 found by nvidia-smi and torch")


@pytest.mark.parametrize(("dataset", "requested", "gpu", "expected"), [
    ("synthetic", None, NO_GPU, "quick"),
    ("synthetic", None, GPU, "quick"),
    ("k49", None, GPU, "full"),
    ("k49", None, NO_GPU, "cpu"),
    ("kmnist", None, NO_GPU, "cpu"),
    ("k49", "quick", GPU, "quick"),  # an explicit profile always wins
    ("synthetic", "full", NO_GPU, "full"),
])
def test_make_run_picks_the_profile_for_the_data_and_the_machine(
    dataset: str, requested: str | None, gpu: tuple[bool, str], expected: str
) -> None:
    profile, why = profile_choice.choose_profile(dataset, requested, gpu)
    assert profile == expected
    assert why  # always says why


def test_forcing_the_gpu_recipe_onto_a_cpu_says_what_to_pick_instead() -> None:
    profile, why = profile_choice.choose_profile("k49", "full", NO_GPU)
    assert profile == "full" and "PROFILE=cpu" in why and "no nvidia-smi" in why
    assert "PROFILE=cpu" not in profile_choice.choose_profile("k49", "full", GPU)[1]


@cache
def _full_train_section() -> TrainSettings:
    with tempfile.TemporaryDirectory() as folder:
        return load_settings(write_params(Path(folder) / "params.yaml", {"profile": "full"})).train


def _settings(root: Path, profile: str, device: str = "cpu", **train: object) -> SimpleNamespace:
    """The few settings the estimate reads (the K49-sized full recipe: 60 epochs, 30 trials x 10 epochs,
    the refit continuing for half the validated run's epochs)."""
    return SimpleNamespace(
        profile=profile,
        train=_full_train_section().model_copy(update={
            "device": device, "epochs": 60, "max_train_per_class": None, "max_val_per_class": None,
            "refit": True, "refit_epochs_fraction": 0.5, **train}),
        tune=SimpleNamespace(n_trials=30, epochs=10, max_train_per_class=1500, max_val_per_class=None),
        path=lambda name: root / name,
    )


def test_the_cpu_estimate_counts_capped_images_epochs_and_cores() -> None:
    settings = _settings(Path("."), "full")
    train, val = [6000, 400], [600, 40]
    rate = profile_choice.cpu_images_per_s_per_core(settings.train.amp) * 2
    assert profile_choice.images_used(train, 1500) == 1900
    # The validated run (validation at a third of a training image's cost), then the refit on both splits
    # for half as many epochs (rounded up).
    assert profile_choice.estimated_cpu_seconds("train", settings, train, val, cores=2) == pytest.approx(
        60 * (6400 + 640 / 3) / rate + 30 * (6400 + 640) / rate)
    odd = _settings(Path("."), "full", epochs=7)
    assert profile_choice.estimated_cpu_seconds("train", odd, train, val, cores=2) == pytest.approx(
        7 * (6400 + 640 / 3) / rate + 4 * (6400 + 640) / rate)
    no_refit = _settings(Path("."), "full", refit=False)
    assert profile_choice.estimated_cpu_seconds("train", no_refit, train, val, cores=2) == pytest.approx(
        60 * (6400 + 640 / 3) / rate)
    assert profile_choice.estimated_cpu_seconds("tune", settings, train, val, cores=2) == pytest.approx(
        300 * (1900 + 640 / 3) / rate)
    assert profile_choice.readable_duration(45) == "45 s"
    assert profile_choice.readable_duration(600) == "10 min"
    assert profile_choice.readable_duration(5 * 3600) == "5.0 h"
    assert profile_choice.readable_duration(4 * 86400) == "4.0 days"


def test_the_cpu_rate_is_the_amx_one_only_for_the_bf16_step_on_a_cpu_with_amx() -> None:
    import torch

    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    assert profile_choice.cpu_images_per_s_per_core(amp=False) == profile_choice.CPU_IMAGES_PER_S_PER_CORE
    assert profile_choice.cpu_images_per_s_per_core(amp=True) == (
        profile_choice.AMX_IMAGES_PER_S_PER_CORE if amx else profile_choice.CPU_IMAGES_PER_S_PER_CORE)
    assert profile_choice.AMX_IMAGES_PER_S_PER_CORE > profile_choice.CPU_IMAGES_PER_S_PER_CORE


def test_the_full_recipe_on_a_cpu_states_its_time_and_the_cpu_profile(tmp_path: Path) -> None:
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    # K49's prepared split: 209,128 train / 23,237 val images over 49 classes.
    counts = {"train": [4268] * 49, "val": [474] * 49}
    (prepared / profile_choice.STATS_FILE).write_text(json.dumps({"counts": counts}), encoding="utf-8")

    note = profile_choice.cpu_time_note("train", _settings(tmp_path, "full"))
    assert note is not None
    assert " h " in note or " days " in note  # hours at the least, never minutes
    assert "make run PROFILE=cpu" in note and "dvc exp run -S profile=cpu" in note
    quick_note = profile_choice.cpu_time_note("train", _settings(tmp_path, "quick"))
    assert quick_note is not None and "PROFILE=cpu" not in quick_note
    assert profile_choice.cpu_time_note("train", _settings(tmp_path, "full", device="cuda")) is None
    assert profile_choice.cpu_time_note("train", _settings(tmp_path / "elsewhere", "full")) is None


def test_a_run_states_its_whole_cpu_time_before_it_starts(tmp_path: Path) -> None:
    def note(**values: str) -> str | None:
        return profile_choice.run_time_note(load_settings(PROJECT_ROOT / "params.yaml", overrides=values))

    # A local folder: its labels file gives the per-class counts (kmnist-dev: 6,011 train images).
    dev = note(**{"data.dataset": "local", "data.local_dir": str(KMNIST_DEV), "profile": "cpu"})
    assert dev is not None and "6,011 train images" in dev and "tune (" in dev and "train (" in dev
    # Official sets before their download: the published totals.
    kmnist = note(**{"data.dataset": "kmnist", "profile": "cpu"})
    assert kmnist is not None and "60,000 train images" in kmnist and " min " in kmnist
    k49_full = note(**{"data.dataset": "k49", "profile": "full"})
    assert k49_full is not None and "232,365 train images" in k49_full
    assert " h " in k49_full or "days" in k49_full  # a day or more: hours with AMX, days without
    untuned = note(**{"data.dataset": "kmnist", "profile": "cpu", "tune.n_trials": "0"})
    assert untuned is not None and "tune (off)" in untuned
    # Nothing to say: the smoke run, a GPU, a folder the download stage will reject.
    assert note(**{"data.dataset": "synthetic", "profile": "quick"}) is None
    assert note(**{"data.dataset": "kmnist", "profile": "cpu", "train.device": "cuda"}) is None
    assert note(**{"data.dataset": "local", "data.local_dir": str(tmp_path), "profile": "cpu"}) is None


def _write_run(project: Path, decision: str = "champion") -> None:
    (project / "reports" / "eval").mkdir(parents=True)
    (project / "params.yaml").write_text(yaml.safe_dump(
        {"profile": "quick", "data": {"dataset": "synthetic"}, "paths": {"reports": "reports"}}), encoding="utf-8")
    (project / "reports" / "eval" / "metrics.json").write_text(json.dumps(
        {"test_balanced_accuracy": 0.91234, "test_accuracy": 0.93, "test_macro_f1": 0.9, "n_test": 245}))
    (project / "reports" / "registry.json").write_text(json.dumps({
        "model_name": "kuzushiji-spinalvgg-synthetic", "version": "4", "decision": decision,
        "alias": "champion" if decision == "champion" else "challenger", "reason": "beats v3",
        "champion_version": "4" if decision == "champion" else "3"}))
    (project / "reports" / "bento_model.json").write_text(json.dumps({"tag": "kuzushiji-spinalvgg:abc"}))


def test_the_summary_names_data_profile_score_model_and_next_steps(tmp_path: Path) -> None:
    _write_run(tmp_path)
    text = "\n".join(run_summary.summary_lines(tmp_path, "http://127.0.0.1:4321"))
    assert "synthetic" in text and "quick" in text
    assert "0.9123" in text and "245 test images" in text
    assert "kuzushiji-spinalvgg-synthetic version 4 (alias champion)" in text and "beats v3" in text
    assert "make serve" in text and "make mlflow-ui" in text and "make prefect-ui  -> http://127.0.0.1:4321" in text
    assert max(len(line) for line in text.splitlines()) < 120  # readable in a terminal


def test_the_summary_links_the_experiment_in_mlflows_training_view(tmp_path: Path) -> None:
    _write_run(tmp_path)
    assert run_summary.mlflow_ui_url(tmp_path).endswith("/#/experiments?workflowType=machine_learning")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "train_run.json").write_text(json.dumps({"run_id": "r", "experiment_id": "7"}))
    url = "http://127.0.0.1:5000/#/experiments/7?workflowType=machine_learning"
    assert run_summary.mlflow_ui_url(tmp_path) == url
    assert f"make mlflow-ui   -> {url}" in "\n".join(run_summary.summary_lines(tmp_path))


def test_a_deployment_without_a_profile_chooses_it_as_make_run_does(tmp_path: Path) -> None:
    from flows import dvc_pipeline

    _write_run(tmp_path)  # params.yaml: data.dataset synthetic
    # No dataset given: params.yaml's (synthetic) decides, as `make run DATASET=synthetic` does.
    assert dvc_pipeline.choose_profile(tmp_path, None, None) == profile_choice.choose_profile(
        "synthetic", None, (False, "not checked"))
    assert dvc_pipeline.choose_profile(tmp_path, None, None)[0] == "quick"
    assert dvc_pipeline.choose_profile(tmp_path, "k49", "cpu")[0] == "cpu"  # a given profile wins


def test_a_challenger_summary_says_which_version_is_served(tmp_path: Path) -> None:
    _write_run(tmp_path, decision="challenger")
    text = "\n".join(run_summary.summary_lines(tmp_path))
    assert "alias challenger" in text and "the champion stays version 3" in text


def test_the_summary_of_an_unfinished_run_says_what_did_not_run(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"profile": "cpu", "data": {"dataset": "k49"}}))
    text = "\n".join(run_summary.summary_lines(tmp_path))
    assert "evaluate has not run" in text and "register has not run" in text and "package has not run" in text


def test_every_dvc_stage_has_a_pipeline_function_in_the_table() -> None:
    dvc_stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert list(STAGES) == list(dvc_stages)
    for name, command in ((name, stage["cmd"]) for name, stage in dvc_stages.items()):
        assert command == f"python -m flows {name}"
        assert callable(STAGE_FUNCTIONS[name].resolve())


def test_a_run_uses_the_users_prefect_api_url_and_starts_nothing(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    def no_start(*_args: object, **_kwargs: object) -> str:
        raise AssertionError("a server was started although PREFECT_API_URL is set")

    monkeypatch.setattr(server, "start_server", no_start)
    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.internal:4200/api")
    api = server.ensure_server(port=server.DEFAULT_PORT, project_dir=tmp_path)
    assert (api.url, api.origin) == ("http://prefect.internal:4200/api", "PREFECT_API_URL")
    assert not (tmp_path / server.STATE_DIR).exists()
    assert "nothing stopped" in server.stop_server(tmp_path)  # stop never touches a server it did not start
