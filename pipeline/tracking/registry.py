"""The registry's champion as serving needs it: its ONNX files, version, metrics and dataset."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from pipeline.config import Settings
from pipeline.contract import (
    CLASSMAP_FILE,
    META_FILE,
    ONNX_FILE,
    STATUS_READY,
    TAG_STATUS,
    TEST_METRICS,
)
from pipeline.tracking.store import ONNX_ARTIFACT, TAG_DATASET, TrackingError, tracking_uri

log = logging.getLogger(__name__)

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
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(
        run_id=version.run_id, artifact_path=ONNX_ARTIFACT, dst_path=str(dest_dir),
        tracking_uri=uri))
    files = {"onnx": local / ONNX_FILE, "classmap": local / CLASSMAP_FILE,
             "meta": local / META_FILE}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise TrackingError(f"{name} v{version.version}: run {version.run_id} lacks {', '.join(missing)}; "
                            "re-run the train stage so it logs the ONNX files")
    metrics = {key: value for key in TEST_METRICS if (value := metric_value(version.tags.get(key))) is not None}
    return {**files, "model_name": name, "version": str(version.version), "run_id": version.run_id,
            "alias": alias, "metrics": metrics, "dataset": version.tags.get(TAG_DATASET)}
