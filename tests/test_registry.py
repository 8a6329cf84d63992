"""Model registry on a real MLflow SQLite store (one per module): champion/challenger, rollback, export,
and packaging the champion into a real BentoML model store in a temp dir."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pytest

from pipeline import tracking
from pipeline.config import Settings, load_settings, write_params
from pipeline.contract import CLASSMAP_FILE, TRAIN_RUN_FILE, ClassMap, TrainRun, write_classmap
from pipeline.export import export_onnx
from pipeline.stages import register as registry
from tests.support import PROJECT_ROOT
from tests.test_export import raw_pixels, small_model

MANIFEST = {
    "dataset": "synthetic",
    "prefix": "k49",
    "source": "synthetic:seed=0",
    "files": {"k49-train-imgs.npz": {"md5": "0123456789abcdef0123456789abcdef", "bytes": 1000},
              "k49-test-imgs.npz": {"md5": "fedcba9876543210fedcba9876543210", "bytes": 200}},
}

TrainedRun = Callable[[Settings, float], str]
TEN_CLASSES = ClassMap.from_chars("おきすつなはまやれを")  # KMNIST's: chance 0.1, default floor 0.55


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    root = tmp_path_factory.mktemp("registry")
    write_params(root / "params.yaml", {"profile": "quick", **{'data.dataset': 'synthetic'}})
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(tracking.TRACKING_URI_ENV, raising=False)
        yield load_settings(root / "params.yaml")


@pytest.fixture(scope="module")
def trained_run(settings: Settings) -> TrainedRun:
    """Log a real training run (PyTorch model, ONNX files, dataset, test metrics) as train+evaluate do."""
    files = settings.root / "exported"
    files.mkdir()
    model, example = small_model(), raw_pixels(2)
    export_onnx(model, files / "model.onnx", example)
    (files / "classmap.csv").write_text("index,codepoint,char\n0,U+3042,あ\n", encoding="utf-8")
    (files / "meta.json").write_text(json.dumps({"classes": ["あ"]}), encoding="utf-8")

    def _make(run_settings: Settings, balanced_accuracy: float) -> str:
        with tracking.start_run(run_settings, "train") as active:
            mlflow.log_input(tracking.manifest_dataset(MANIFEST, run_settings.path("raw"), {"train": 10}),
                             context="training")
            tracking.log_model(model, files / "model.onnx", example, files)
        with tracking.start_run(run_settings, "evaluate", run_id=active.info.run_id):
            tracking.log_metrics({"test_balanced_accuracy": balanced_accuracy,
                                  "test_accuracy": balanced_accuracy + 0.01,
                                  "test_macro_f1": balanced_accuracy})
        models = run_settings.path("models")
        models.mkdir(parents=True, exist_ok=True)
        TrainRun(active.info.run_id, active.info.experiment_id, "").write(models / TRAIN_RUN_FILE)
        write_classmap(TEN_CLASSES, models / CLASSMAP_FILE)  # the quality floor depends on the class count
        return active.info.run_id

    return _make


def named(settings: Settings, model_name: str) -> Settings:
    return settings.with_overrides({"registry.model_name": model_name})


def client(settings: Settings) -> mlflow.MlflowClient:
    uri = tracking.tracking_uri(settings)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def alias_version(settings: Settings, alias: str) -> str | None:
    try:
        version = client(settings).get_model_version_by_alias(settings.registered_model_name(), alias)
        return str(version.version)
    except mlflow.exceptions.MlflowException:
        return None


def report(settings: Settings) -> dict:
    return json.loads((settings.path("reports") / "registry.json").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_champion_moves_only_on_improvement(settings: Settings, trained_run: TrainedRun) -> None:
    cfg = named(settings, "ladder")
    champion, challenger = cfg.registry.champion_alias, cfg.registry.challenger_alias

    first_run = trained_run(cfg, 0.80)
    first = registry.run(cfg)
    assert (first["version"], first["decision"], first["champion_version"]) == ("1", "champion", "1")
    assert alias_version(cfg, champion) == "1"
    assert report(cfg)["run_id"] == first_run and report(cfg)["decision"] == "champion"

    trained_run(cfg, 0.70)
    second = registry.run(cfg)
    assert (second["version"], second["decision"], second["champion_version"]) == ("2", "challenger", "1")
    assert "does not beat champion v1" in second["reason"]
    assert alias_version(cfg, champion) == "1" and alias_version(cfg, challenger) == "2"

    trained_run(cfg, 0.85)
    third = registry.run(cfg)
    assert (third["version"], third["decision"], third["champion_version"]) == ("3", "champion", "3")
    assert third["previous_champion_version"] == "1"
    assert third["previous_champion_test_balanced_accuracy"] == pytest.approx(0.80)
    assert alias_version(cfg, champion) == "3" and alias_version(cfg, challenger) == "2"

    assert cfg.registered_model_name() == "ladder-synthetic"
    version = client(cfg).get_model_version("ladder-synthetic", "3")
    assert version.tags["status"] == "ready"
    assert float(version.tags["test_balanced_accuracy"]) == pytest.approx(0.85)
    assert version.tags["dataset"] == "synthetic"
    assert version.tags["data.md5.k49-test-imgs.npz"] == MANIFEST["files"]["k49-test-imgs.npz"]["md5"]
    assert version.tags["data.digest"]
    if tracking.git_commit(PROJECT_ROOT):
        assert len(version.tags["git_commit"]) == 40
    # The description says what the version is: decision, dataset, test metrics, data version, commit.
    assert version.description.startswith("**champion**: test_balanced_accuracy 0.850000 beats champion v1")
    assert "- dataset: synthetic" in version.description
    assert "test_balanced_accuracy **0.8500**" in version.description
    assert f"dataset digest `{version.tags['data.digest']}`" in version.description
    assert MANIFEST["files"]["k49-test-imgs.npz"]["md5"] in version.description
    assert f"- commit: `{version.tags.get('git_commit', 'not in a git checkout')}`" in version.description
    loser = client(cfg).get_model_version("ladder-synthetic", "2")
    assert loser.tags["decision"] == "challenger" and "0.700000" in loser.tags["decision_reason"]

    # Re-running the stage for the same training run decides again but never duplicates the version.
    again = registry.run(cfg)
    assert (again["version"], again["decision"]) == ("3", "champion")
    assert len(client(cfg).search_model_versions("name = 'ladder-synthetic'")) == 3

    served = tracking.champion_artifacts(cfg, cfg.root / "champion")
    assert served["version"] == "3" and served["metrics"]["test_balanced_accuracy"] == pytest.approx(0.85)
    for key in ("onnx", "classmap", "meta"):
        assert Path(served[key]).is_file() and Path(served[key]).stat().st_size > 0
    assert Path(served["onnx"]).read_bytes() == (cfg.root / "exported" / "model.onnx").read_bytes()
    # The registered version is the served ONNX model: pyfunc on the champion alias runs ONNX Runtime.
    registry_uri = tracking.tracking_uri(cfg)
    mlflow.set_registry_uri(registry_uri)
    champion_model = mlflow.pyfunc.load_model(f"models:/ladder-synthetic@{champion}")
    assert champion_model.metadata.flavors.keys() >= {"onnx"}
    logits = champion_model.predict(raw_pixels(2))["logits"]
    assert logits.shape[0] == 2


@pytest.mark.slow
def test_a_model_under_the_quality_floor_is_rejected_and_nothing_served_changes(
        settings: Settings, trained_run: TrainedRun) -> None:
    cfg = named(settings, "gate")
    trained_run(cfg, 0.80)
    assert registry.run(cfg)["decision"] == "champion"
    trained_run(cfg, 0.125)  # a model that learned (almost) nothing: 10 classes, chance 0.1
    with pytest.raises(registry.QualityGateError, match=r"version 2 is rejected.*under the quality floor "
                       r"0\.550000.*champion \(v1\) and the served model are unchanged"):
        registry.run(cfg)
    assert alias_version(cfg, cfg.registry.champion_alias) == "1"
    assert alias_version(cfg, cfg.registry.rejected_alias) == "2"
    assert alias_version(cfg, cfg.registry.challenger_alias) is None
    rejected = client(cfg).get_model_version("gate-synthetic", "2")
    assert rejected.tags["decision"] == "rejected" and rejected.tags["status"] == "ready"
    assert "registry.min_balanced_accuracy" in rejected.tags["decision_reason"]
    record = report(cfg)
    assert (record["decision"], record["alias"], record["champion_version"]) == ("rejected", "rejected", "1")
    assert tracking.champion_artifacts(cfg, cfg.root / "gate-served")["version"] == "1"

    strict = cfg.with_overrides({"registry.min_balanced_accuracy": 0.9})  # an explicit floor wins
    trained_run(strict, 0.85)
    with pytest.raises(registry.QualityGateError, match="0.900000"):
        registry.run(strict)
    assert alias_version(cfg, cfg.registry.champion_alias) == "1"


def test_default_quality_floor_is_halfway_from_chance(make_settings) -> None:
    cfg = make_settings()
    assert registry.quality_floor(cfg, 10) == pytest.approx(0.55)
    assert registry.quality_floor(cfg, 49) == pytest.approx(1 / 49 + (1 - 1 / 49) / 2)
    assert registry.quality_floor(cfg.with_overrides({"registry.min_balanced_accuracy": 0.3}), 49) == 0.3
    assert registry.decide(0.5, "k49", "2", None, "champion", floor=0.51)[0] == "rejected"


@pytest.mark.slow
def test_failure_after_registration_rolls_back(settings: Settings, trained_run: TrainedRun) -> None:
    cfg = named(settings, "rollback")
    trained_run(cfg, 0.60)
    assert registry.run(cfg)["version"] == "1"
    trained_run(cfg, 0.99)  # would become champion ...
    blocker = cfg.path("reports") / "registry.json"
    blocker.unlink()
    blocker.mkdir()
    (blocker / "keep").write_text("x")  # ... but the report cannot be written
    with pytest.raises(OSError):
        registry.run(cfg)
    failed = client(cfg).get_model_version("rollback-synthetic", "2")
    assert failed.tags["status"] == "failed" and "failure_reason" in failed.tags
    assert alias_version(cfg, cfg.registry.champion_alias) == "1"  # the champion was put back
    with pytest.raises(tracking.TrackingError, match="run the register stage"):
        tracking.champion_artifacts(named(cfg, "rollback-none"), cfg.root / "none")

    shutil.rmtree(blocker)
    retried = registry.run(cfg)  # the failed version is ignored; a clean one takes its place
    assert (retried["version"], retried["decision"]) == ("3", "champion")
    assert tracking.champion_artifacts(cfg, cfg.root / "served")["version"] == "3"


@pytest.mark.slow
def test_error_after_creating_a_version_marks_it_failed(settings: Settings, trained_run: TrainedRun) -> None:
    cfg = named(settings, "pending")
    broken = cfg.with_overrides({"registry.champion_alias": "bad alias!"})  # MLflow refuses the lookup
    trained_run(cfg, 0.70)
    with pytest.raises(mlflow.exceptions.MlflowException, match="Invalid alias name"):
        registry.run(broken)
    created = client(cfg).get_model_version("pending-synthetic", "1")
    assert created.tags["status"] == "failed"  # not left "pending"
    assert "Invalid alias name" in created.tags["failure_reason"]
    retried = registry.run(cfg)  # the failed version is ignored; a clean one takes its place
    assert (retried["version"], retried["decision"]) == ("2", "champion")


@pytest.mark.slow
def test_each_dataset_has_its_own_champion_and_bento_model(settings: Settings, trained_run: TrainedRun,
                                                           bento_store: Path) -> None:
    import bentoml

    from pipeline.stages import package as bento

    synthetic = named(settings, "perdata")
    k49 = synthetic.with_overrides({"data.dataset": "k49"})
    synthetic_run = trained_run(synthetic, 0.95)
    assert registry.run(synthetic)["decision"] == "champion"
    k49_run = trained_run(k49, 0.60)  # worse than the synthetic champion, but on other data
    k49_report = registry.run(k49)
    assert (k49_report["model_name"], k49_report["version"], k49_report["decision"]) == (
        "perdata-k49", "1", "champion")
    assert alias_version(synthetic, "champion") == "1" and alias_version(k49, "champion") == "1"
    assert tracking.champion_artifacts(k49, k49.root / "k49-champion")["run_id"] == k49_run

    # Both registered models are at version 1: the package stage must not reuse the synthetic model.
    synthetic_tag = bento.import_champion(synthetic)
    k49_tag = bento.import_champion(k49)
    assert k49_tag != synthetic_tag
    labels = bentoml.models.get(k49_tag).info.labels
    assert (labels["registry_model"], labels["registry_version"], labels["run_id"]) == ("perdata-k49", "1",
                                                                                        k49_run)
    assert labels["onnx_md5"] == bento._md5_of(k49.root / "exported" / "model.onnx")
    assert bentoml.models.get(synthetic_tag).info.labels["run_id"] == synthetic_run
    assert bento.import_champion(k49) == k49_tag  # same model, version, run and bytes: reused
    assert len(bentoml.models.list(settings.serve.bento_model)) == 2
    report = json.loads((k49.path("reports") / bento.REPORT_FILE).read_text(encoding="utf-8"))
    assert (report["tag"], report["registry_model"], report["run_id"]) == (k49_tag, "perdata-k49", k49_run)


def test_bento_model_is_reused_only_for_the_same_model_version_run_and_bytes(
        settings: Settings, bento_store: Path, tmp_path: Path) -> None:
    import bentoml

    from pipeline.stages import package as bento

    files = tmp_path / "files"
    files.mkdir()
    (files / "model.onnx").write_bytes(b"first onnx bytes")
    (files / "classmap.csv").write_text("index,codepoint,char\n0,U+3042,あ\n", encoding="utf-8")
    (files / "meta.json").write_text(json.dumps({"run_id": "a" * 32}), encoding="utf-8")

    def store(**identity: str) -> str:
        return bento.store_model(settings, onnx_path=files / "model.onnx", classmap_path=files / "classmap.csv",
                                 meta_path=files / "meta.json", metrics={}, **identity)

    first = store(registry_version="1")
    assert bentoml.models.get(first).info.labels["registry_model"] == settings.registered_model_name()
    assert store(registry_version="1") == first  # identical: reused
    tags = {first}
    for identity in ({"registry_version": "1", "registry_model": "other-model"},  # another name, same number
                     {"registry_version": "1", "run_id": "b" * 32},  # another run (e.g. a fresh store)
                     {"registry_version": "2"}):
        tag = store(**identity)
        assert tag not in tags, identity
        tags.add(tag)
    (files / "model.onnx").write_bytes(b"other onnx bytes")
    assert store(registry_version="2") not in tags  # same labels, different ONNX file


def test_unevaluated_run_is_refused_before_registering(settings: Settings) -> None:
    cfg = named(settings, "unevaluated")
    with tracking.start_run(cfg, "train") as active:
        pass
    models = cfg.path("models")
    models.mkdir(parents=True, exist_ok=True)
    (models / "train_run.json").write_text(json.dumps({"run_id": active.info.run_id}), encoding="utf-8")
    write_classmap(TEN_CLASSES, models / CLASSMAP_FILE)  # its own, not one an earlier test left behind
    with pytest.raises(registry.RegistryError, match="run the evaluate stage first"):
        registry.run(cfg)
    assert client(cfg).search_model_versions("name = 'unevaluated-synthetic'") == []


def test_decide_rules() -> None:
    class Version:
        def __init__(self, version: str, value: float | None, dataset: str = "k49") -> None:
            self.version = version
            self.tags = {"dataset": dataset}
            if value is not None:
                self.tags["test_balanced_accuracy"] = repr(value)

    assert registry.decide(0.5, "k49", "1", None, "champion")[0] == "champion"
    tie = registry.decide(0.9, "k49", "2", Version("1", 0.9), "champion")
    assert tie[0] == "challenger"  # a tie keeps the champion
    assert registry.decide(0.91, "k49", "2", Version("1", 0.9), "champion")[0] == "champion"
    decision, reason = registry.decide(0.99, "kmnist", "2", Version("1", 0.5), "champion")
    assert decision == "challenger" and "not comparable" in reason
    assert registry.decide(0.1, "k49", "2", Version("1", None), "champion")[0] == "champion"
