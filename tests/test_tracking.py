"""MLflow tracking against a real SQLite store in a temp dir (one per module: migrations are slow)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest

from pipeline import tracking
from pipeline.config import Settings, load_settings, write_params
from pipeline.export import export_onnx
from tests.support import PROJECT_ROOT
from tests.test_export import NUM_CLASSES, raw_pixels, small_model


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    root = tmp_path_factory.mktemp("tracking")
    write_params(root / "params.yaml", {"profile": "quick", **{}})
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(tracking.TRACKING_URI_ENV, raising=False)
        yield load_settings(root / "params.yaml")


@pytest.fixture(autouse=True)
def no_user_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a process whose user set no tracking URI (mlflow exports the one it uses)."""
    monkeypatch.delenv(tracking.TRACKING_URI_ENV, raising=False)


def client(settings: Settings) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking.tracking_uri(settings))


def test_default_uri_is_sqlite_under_paths_mlflow(settings: Settings) -> None:
    uri = tracking.tracking_uri(settings)
    assert uri == f"sqlite:///{settings.path('mlflow').resolve()}/mlflow.db"
    experiment_id = tracking.configure(settings)
    experiment = client(settings).get_experiment(experiment_id)
    assert experiment.name == settings.mlflow.experiment
    assert experiment.artifact_location == (settings.path("mlflow").resolve() / "artifacts").as_uri()
    assert tracking.configure(settings) == experiment_id  # idempotent


def test_env_uri_wins(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tracking.TRACKING_URI_ENV, "http://127.0.0.1:5999")
    assert tracking.tracking_uri(settings) == "http://127.0.0.1:5999"
    assert tracking.is_remote(tracking.tracking_uri(settings))


def test_user_env_uri_wins_on_every_configure(settings: Settings, make_settings: Callable[..., Settings],
                                             monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    store = tmp_path / "user-store"
    store.mkdir()
    user_uri = f"sqlite:///{store.resolve() / 'user.db'}"
    monkeypatch.setenv(tracking.TRACKING_URI_ENV, user_uri)
    other = make_settings()
    for cfg in (settings, other, settings):  # mlflow re-exports the URI on each configure()
        experiment_id = tracking.configure(cfg)
        assert tracking.tracking_uri(cfg) == user_uri
        assert mlflow.get_tracking_uri() == user_uri
    assert mlflow.MlflowClient(user_uri).get_experiment(experiment_id).name == settings.mlflow.experiment
    assert not (other.path("mlflow") / tracking.DB_FILE).exists()


def test_settings_roots_without_env_keep_separate_stores(settings: Settings,
                                                         make_settings: Callable[..., Settings]) -> None:
    def local(cfg: Settings) -> str:
        return f"sqlite:///{cfg.path('mlflow').resolve() / tracking.DB_FILE}"

    other = make_settings()
    for cfg in (settings, other, settings):
        tracking.configure(cfg)
        assert os.environ[tracking.TRACKING_URI_ENV] == local(cfg)  # exported by mlflow, not the user's
        assert tracking.tracking_uri(cfg) == mlflow.get_tracking_uri() == local(cfg)
    assert (other.path("mlflow") / tracking.DB_FILE).is_file()


def test_successful_run_is_tagged_and_finished(settings: Settings) -> None:
    with tracking.start_run(settings, "train", tags={"extra": "yes"}) as active:
        tracking.log_settings(settings)
        tracking.log_epoch(1, {"val_loss": 0.75, "val_accuracy": 0.5})
        tracking.log_epoch(2, {"val_loss": 0.5, "val_accuracy": 0.625})
    run = client(settings).get_run(active.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.TAG_STAGE] == "train"
    assert run.data.tags[tracking.TAG_DATASET] == settings.data.dataset
    assert run.data.tags[tracking.TAG_PROFILE] == "quick"
    assert run.data.tags["extra"] == "yes"
    if tracking.git_commit(PROJECT_ROOT):
        assert len(run.data.tags[tracking.TAG_GIT_COMMIT]) == 40
    assert run.data.params["train.epochs"] == str(settings.train.epochs)
    assert run.data.params["model.tta_rotations_deg"] == json.dumps(settings.model.tta_rotations_deg)  # a list
    history = client(settings).get_metric_history(active.info.run_id, "val_loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.75), (2, 0.5)]


def test_failing_run_ends_failed_with_reason(settings: Settings) -> None:
    with pytest.raises(ValueError, match="boom"):
        with tracking.start_run(settings, "train") as active:
            mlflow.log_metric("partial", 1.0)
            raise ValueError("boom")
    run = client(settings).get_run(active.info.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[tracking.TAG_FAILURE] == "ValueError: boom"
    assert mlflow.active_run() is None


def test_resume_keeps_stage_tag_and_nested_runs_end(settings: Settings) -> None:
    with tracking.start_run(settings, "train") as first:
        with tracking.start_run(settings, "tune", name="trial 0", nested=True) as child:
            mlflow.log_metric("trial_value", 0.3)
    with tracking.start_run(settings, "evaluate", run_id=first.info.run_id):
        mlflow.log_metric("test_accuracy", 0.9)
    runs = client(settings)
    run = runs.get_run(first.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.TAG_STAGE] == "train"
    assert run.data.metrics["test_accuracy"] == 0.9
    nested = runs.get_run(child.info.run_id)
    assert nested.info.status == "FINISHED"
    assert nested.data.tags["mlflow.parentRunId"] == first.info.run_id


def test_resuming_an_unknown_run_is_explained(settings: Settings) -> None:
    with pytest.raises(tracking.TrackingError, match="cannot resume MLflow run"):
        with tracking.start_run(settings, "evaluate", run_id="0" * 32):
            pass


def test_manifest_dataset_records_source_checksums_and_splits(settings: Settings) -> None:
    manifest = {
        "dataset": "k49",
        "prefix": "k49",
        "source": "http://codh.rois.ac.jp/kmnist/dataset/k49/",
        "files": {
            "k49-train-imgs.npz": {"md5": "7ac088b20481cf51dcd01ceaab89d821", "bytes": 63_000_000},
            "k49-test-imgs.npz": {"md5": "d352e201d846ce6b94f42c990966f374", "bytes": 11_000_000},
        },
    }
    dataset = tracking.manifest_dataset(manifest, settings.path("raw"), {"train": 900, "val": 100})
    assert dataset.name == "k49:k49"
    assert dataset.source.url == manifest["source"]
    assert dataset.profile["splits"] == {"train": 900, "val": 100}
    assert dataset.profile["files"]["k49-test-imgs.npz"]["md5"] == "d352e201d846ce6b94f42c990966f374"
    changed = json.loads(json.dumps(manifest))
    changed["files"]["k49-test-imgs.npz"]["md5"] = "0" * 32
    other = tracking.manifest_dataset(changed, settings.path("raw"), {"train": 900, "val": 100})
    assert other.digest != dataset.digest  # the digest follows the bytes
    local = tracking.manifest_dataset({**manifest, "source": "synthetic"}, settings.path("raw"), {"train": 1})
    assert str(settings.path("raw").resolve()) in local.source.to_json()
    with tracking.start_run(settings, "train") as active:
        mlflow.log_input(dataset, context="training")
    inputs = client(settings).get_run(active.info.run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("k49:k49", dataset.digest)]
    assert json.loads(inputs[0].dataset.profile)["splits"]["train"] == 900


@pytest.mark.slow
def test_log_model_stores_pytorch_and_the_served_onnx_model(settings: Settings, tmp_path: Path) -> None:
    model = small_model()
    example = raw_pixels(1)  # batch 1 on purpose: pt2 needs > 1 to keep the batch axis dynamic
    onnx_path = export_onnx(model, tmp_path / "exported.onnx", example)
    (tmp_path / "classmap.csv").write_text("index,codepoint,char\n0,U+3042,あ\n", encoding="utf-8")
    (tmp_path / "meta.json").write_text(json.dumps({"num_classes": NUM_CLASSES}), encoding="utf-8")
    with tracking.start_run(settings, "train") as active:
        model_uri = tracking.log_model(model, onnx_path, example, tmp_path)
    import torch

    batch = raw_pixels(3, seed=5)
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    # The returned (and registered) model is the ONNX export: ONNX flavor, signature, input example.
    served = mlflow.models.get_model_info(model_uri)
    assert set(served.flavors) == {"onnx", "python_function"}
    assert served.signature is not None and served.saved_input_example_info is not None
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "served")))
    assert sorted(p.name for p in (local / "extra_files").iterdir()) == ["classmap.csv", "meta.json"]
    assert (local / "model.onnx").read_bytes() == onnx_path.read_bytes()  # one self-contained file
    predicted = mlflow.pyfunc.load_model(model_uri).predict(batch)["logits"]
    np.testing.assert_allclose(predicted, expected, atol=1e-4)
    # The PyTorch model is logged too, under `model`.
    (pytorch,) = [m for m in mlflow.search_logged_models(experiment_ids=[active.info.experiment_id],
                                                         output_format="list")
                  if m.source_run_id == active.info.run_id and m.name == tracking.MODEL_ARTIFACT]
    loaded = mlflow.pyfunc.load_model(pytorch.model_uri)
    np.testing.assert_allclose(np.asarray(loaded.predict(batch)), expected, atol=1e-5)


def test_log_model_requires_the_serving_files(settings: Settings, tmp_path: Path) -> None:
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"x")
    with pytest.raises(tracking.TrackingError, match="meta.json"):
        tracking.log_model(small_model(), onnx_path, raw_pixels(2), tmp_path)


def test_experiment_opens_in_the_training_view_and_runs_say_what_they_are(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "sunny-kana")
    experiment_id = tracking.configure(settings)
    kind = client(settings).get_experiment(experiment_id).tags[tracking.TAG_EXPERIMENT_KIND]
    assert kind == tracking.EXPERIMENT_KIND == "custom_model_development"  # MLflow 3's model-training view
    with tracking.start_run(settings, "train") as active:
        pass
    run = client(settings).get_run(active.info.run_id)
    commit = tracking.git_commit(PROJECT_ROOT)
    expected = ["train", settings.data.dataset, "quick", "sunny-kana", *([commit[:7]] if commit else [])]
    assert run.info.run_name == " · ".join(expected)
    assert run.data.tags[tracking.TAG_SOURCE_NAME] == "train"  # the Source column, not __main__.py
    assert run.data.tags[tracking.TAG_DVC_EXP] == "sunny-kana"
    if commit:
        assert run.data.tags[tracking.TAG_MLFLOW_GIT_COMMIT] == commit


def test_an_experiment_made_before_the_kind_tag_gets_it(settings: Settings) -> None:
    experiment_id = tracking.configure(settings)
    client(settings).delete_experiment_tag(experiment_id, tracking.TAG_EXPERIMENT_KIND)
    tracking.configure(settings)
    assert client(settings).get_experiment(experiment_id).tags[tracking.TAG_EXPERIMENT_KIND] == tracking.EXPERIMENT_KIND


def test_a_psycopg2_tracking_uri_from_a_guide_uses_the_pinned_driver(settings: Settings,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tracking.TRACKING_URI_ENV, "postgresql+psycopg2://mlflow@db.internal:5432/mlflow")
    assert tracking.tracking_uri(settings) == "postgresql+psycopg://mlflow@db.internal:5432/mlflow"


def test_mlflow_and_optuna_in_one_database_are_refused_before_connecting(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No server answers at db.invalid: the refusal comes before any connection attempt.
    monkeypatch.setenv(tracking.TRACKING_URI_ENV, "postgresql://mlflow@db.invalid/shared")
    shared = settings.with_overrides({"tune.storage": "postgresql+psycopg2://optuna@db.invalid:5432/shared"})
    with pytest.raises(tracking.TrackingError, match="each need a database of their own"):
        tracking.configure(shared)
