"""The Model Registry: versions and aliases of one registered model (with undo), and the champion as
serving needs it (its ONNX files, version, metrics and dataset)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode

from pipeline.config import Settings
from pipeline.contract import (
    CLASSMAP_FILE,
    FEEDBACK_ITEMS_PARAM,
    FEEDBACK_MAX_ID_PARAM,
    META_FILE,
    ONNX_FILE,
    STATUS_FAILED,
    STATUS_READY,
    TAG_STATUS,
    TEST_METRICS,
)
from pipeline.tracking.store import (
    FAILURE_TAG_MAX_CHARS,
    ONNX_ARTIFACT,
    TAG_DATASET,
    TAG_FAILURE,
    TrackingError,
    configure,
    tracking_uri,
)

log = logging.getLogger(__name__)

EXTRA_FILES_DIR = "extra_files"  # where an MLflow model keeps the extra_files it was logged with
LOGGED_MODEL_PREFIX = "models:/"  # a version's source in MLflow 3: the logged model it was registered from

def version_by_alias(client: mlflow.MlflowClient, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST) or "not found" in str(exc).lower():
            return None
        raise


def metric_value(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def champion_artifacts(settings: Settings, dest_dir: Path) -> dict[str, Any]:
    """Download the champion's serving files (``onnx/``) into ``dest_dir``; return paths, version, metrics."""
    uri = tracking_uri(settings)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    name, alias = settings.registered_model_name(), settings.registry.champion_alias
    version = version_by_alias(client, name, alias)
    if version is None:
        raise TrackingError(f"registered model {name!r} has no {alias!r} version at "
                            f"{uri}: run the register stage first "
                            "(`dvc repro register`)")
    if version.tags.get(TAG_STATUS) != STATUS_READY:
        raise TrackingError(f"{name} v{version.version} ({alias}) has status "
                            f"{version.tags.get(TAG_STATUS)!r}, not {STATUS_READY!r}: "
                            "re-run the register stage")
    files = _download_serving_files(client, version, Path(dest_dir), uri)
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise TrackingError(f"{name} v{version.version}: run {version.run_id} lacks {', '.join(missing)}; "
                            "re-run the train stage so it logs the ONNX model")
    metrics = {key: value for key in TEST_METRICS if (value := metric_value(version.tags.get(key))) is not None}
    return {**files, "model_name": name, "version": str(version.version), "run_id": version.run_id,
            "alias": alias, "metrics": metrics, "dataset": version.tags.get(TAG_DATASET)}


def _download_serving_files(client: mlflow.MlflowClient, version: Any, dest_dir: Path, uri: str) -> dict[str, Path]:
    """model.onnx, classmap.csv and meta.json of a version: its registered ONNX model (the class map and meta
    are the model's extra files), or for a version registered before that, the run's ``onnx/`` folder."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    source = str(version.source)
    if source.startswith(LOGGED_MODEL_PREFIX):  # MLflow 3: models:/<model id>, resolved with this store
        location = client.get_logged_model(source.removeprefix(LOGGED_MODEL_PREFIX)).artifact_location
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(dest_dir / "model"),
                                                         tracking_uri=uri))
        if (local / ONNX_FILE).is_file():
            return {"onnx": local / ONNX_FILE, "classmap": local / EXTRA_FILES_DIR / CLASSMAP_FILE,
                    "meta": local / EXTRA_FILES_DIR / META_FILE}
    local = Path(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=ONNX_ARTIFACT,
                                                     dst_path=str(dest_dir / "run"), tracking_uri=uri))
    return {"onnx": local / ONNX_FILE, "classmap": local / CLASSMAP_FILE, "meta": local / META_FILE}


class ModelRegistry:
    """One registered model's versions and aliases; every alias move is remembered so it can be undone."""

    def __init__(self, settings: Settings, name: str) -> None:
        configure(settings)
        uri = tracking_uri(settings)
        self.client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.name = name
        self.undo: list[tuple[str, str | None]] = []  # (alias, version it pointed to before)

    def run(self, run_id: str) -> Any | None:
        """The training run ``run_id``, or None when the store does not hold it."""
        try:
            return self.client.get_run(run_id)
        except MlflowException:
            return None

    def ensure_model(self, description: str) -> None:
        try:
            self.client.create_registered_model(self.name, description=description)
        except MlflowException as exc:
            if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise

    def by_alias(self, alias: str) -> Any | None:
        return version_by_alias(self.client, self.name, alias)

    def existing_version(self, run_id: str) -> Any | None:
        """A usable version already registered from ``run_id`` (re-running must not duplicate it)."""
        versions = self.client.search_model_versions(f"name = '{self.name}' and run_id = '{run_id}'")
        usable = [v for v in versions if v.tags.get(TAG_STATUS) != STATUS_FAILED]
        return max(usable, key=lambda v: int(v.version)) if usable else None

    def create_version(self, run_id: str, tags: dict[str, str]) -> Any:
        """Register the run's model; a version created by a register call that then failed is marked failed."""
        query = f"name = '{self.name}' and run_id = '{run_id}'"
        before = {str(v.version) for v in self.client.search_model_versions(query)}
        try:
            # The served ONNX model (MLflow 3 resolves runs:/<run>/<name> to the run's logged model).
            return mlflow.register_model(f"runs:/{run_id}/{ONNX_ARTIFACT}", self.name, tags=tags)
        except BaseException as exc:
            try:
                created = [v for v in self.client.search_model_versions(query) if str(v.version) not in before]
            except Exception:  # the registry is down: the original error is the one to report
                log.exception("could not look up the %s version being created from run %s", self.name, run_id)
                created = []
            for version in created:
                self.roll_back(str(version.version), exc)
            raise

    def tag(self, version: str, tags: Mapping[str, str], description: str | None = None) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, version, key, value)
        if description is not None:
            self.client.update_model_version(self.name, version, description=description)

    def point(self, alias: str, target: str | None) -> None:
        """Move ``alias`` to version ``target`` (None removes it), remembering where it pointed."""
        current = self.by_alias(alias)
        before = str(current.version) if current else None
        if before == target:
            return
        self.undo.append((alias, before))
        if target is None:
            self.client.delete_registered_model_alias(self.name, alias)
        else:
            self.client.set_registered_model_alias(self.name, alias, target)

    def roll_back(self, version: str, error: BaseException) -> None:
        """Restore the aliases moved so far and mark ``version`` failed; never mask the original error."""
        try:
            for alias, before in reversed(self.undo):
                if before is None:
                    self.client.delete_registered_model_alias(self.name, alias)
                else:
                    self.client.set_registered_model_alias(self.name, alias, before)
            self.tag(version, {TAG_STATUS: STATUS_FAILED,
                               TAG_FAILURE: f"{type(error).__name__}: {error}"[:FAILURE_TAG_MAX_CHARS]})
        except Exception:  # the registry itself is down: the original error is the one to report
            log.exception("could not mark %s version %s as failed", self.name, version)


def champion_feedback(settings: Settings) -> dict[str, Any] | None:
    """The champion's version and the feedback its training data held (items, highest store id), from its
    training run's params (0 for runs from before feedback existed); None when there is no champion."""
    registry = ModelRegistry(settings, settings.registered_model_name())
    version = registry.by_alias(settings.registry.champion_alias)
    if version is None:
        return None
    run = registry.run(version.run_id)
    params = run.data.params if run is not None else {}
    return {"version": str(version.version), "items": int(params.get(FEEDBACK_ITEMS_PARAM, 0)),
            "max_id": int(params.get(FEEDBACK_MAX_ID_PARAM, 0))}
