"""What a run records: settings as flat params, the dataset, per-epoch and final metrics, files, the
model (PyTorch and its ONNX serving files), and the trial runs of a tuning study."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import numpy as np
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from pipeline.config import Settings
from pipeline.contract import (
    CLASSMAP_FILE,
    FEEDBACK_ITEMS_PARAM,
    FEEDBACK_MAX_ID_PARAM,
    META_FILE,
    ONNX_OUTPUT,
)
from pipeline.tracking.store import (
    DATASET_DIGEST_CHARS,
    MODEL_ARTIFACT,
    ONNX_ARTIFACT,
    PARAM_VALUE_MAX_CHARS,
    TAG_FAILURE,
    TrackingError,
    tracking_uri,
)

log = logging.getLogger(__name__)

SEARCH_MAX_RESULTS = 1000  # MLflow runs fetched per search (RUNNING trial runs of one study: a handful)

def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"train.lr": 0.1, ...}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def log_settings(settings: Settings) -> None:
    """Log the effective settings (after profile and overrides) as dotted params of the active run."""
    params = {key: _param_value(value) for key, value in flatten(settings.resolved()).items()}
    mlflow.log_params(params)


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:PARAM_VALUE_MAX_CHARS]


class ManifestDataset(MetaDataset):
    """Dataset metadata from the download manifest: official source, per-file MD5s and split sizes.

    The digest is derived from the file checksums, so two runs on the same bytes share a dataset entry
    in MLflow whatever folder the files sit in.
    """

    def __init__(self, source: DatasetSource, name: str, files: Mapping[str, Mapping[str, Any]],
                 splits: Mapping[str, int]):
        self._profile: dict[str, dict[str, Any]] = {
            "splits": {key: int(value) for key, value in splits.items()},
            "files": {file: {"md5": str(info.get("md5")), "bytes": int(info.get("bytes", 0))}
                      for file, info in sorted(files.items())},
        }
        checksums = json.dumps({file: info["md5"] for file, info in self._profile["files"].items()})
        digest = hashlib.sha256(checksums.encode("utf-8")).hexdigest()[:DATASET_DIGEST_CHARS]
        super().__init__(source=source, name=name, digest=digest)

    @property
    def profile(self) -> dict[str, Any]:
        return copy.deepcopy(self._profile)

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def manifest_dataset(
    manifest: Mapping[str, Any], raw_dir: Path, splits: Mapping[str, int]
) -> ManifestDataset:
    """The dataset record of a download manifest (``data.read_manifest``) and the split sizes.

    The source is the official URL when the files were downloaded, else the folder holding them.
    """
    source_text = str(manifest.get("source") or "")
    source: DatasetSource
    if urlparse(source_text).scheme in ("http", "https"):
        source = HTTPDatasetSource(url=source_text)
    else:
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        with warnings.catch_warnings():  # MLflow registers the local-file source twice and says so
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str(Path(raw_dir).resolve()))
    name = ":".join(str(part) for part in (manifest.get("dataset"), manifest.get("prefix")) if part)
    return ManifestDataset(source=source, name=name or "dataset", files=manifest.get("files") or {},
                           splits=splits)


def log_dataset(settings: Settings, splits: dict[str, int]) -> None:
    """Record the training data (source, per-file MD5s, split sizes) as an input of the active run."""
    from pipeline import data  # lazy: the data module pulls in the download stack

    dataset = manifest_dataset(data.read_manifest(settings), settings.path("raw"), splits)
    mlflow.log_input(dataset, context="training")
    mlflow.log_params({f"data.split_size.{key}": int(value) for key, value in splits.items()})
    feedback = data.read_stats(settings).get("feedback", {})  # the collect stage's items in the train split
    mlflow.log_params({FEEDBACK_ITEMS_PARAM: int(feedback.get("items", 0)),
                       FEEDBACK_MAX_ID_PARAM: int(feedback.get("max_id", 0))})


def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
    """Log one epoch's metrics at ``step=epoch``."""
    mlflow.log_metrics({key: float(value) for key, value in metrics.items()}, step=epoch)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log final (non-epoch) metrics such as test scores into the active run."""
    mlflow.log_metrics({key: float(value) for key, value in metrics.items()}, step=step)


def log_files(paths: Iterable[Path], artifact_path: str) -> None:
    """Attach files (reports, figures) to the active run under ``artifact_path``."""
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_model(model: Any, onnx_path: Path, example: np.ndarray, artifacts_dir: Path) -> str:
    """Log the PyTorch model as MLflow model ``model`` and the served ONNX export as MLflow model ``onnx``
    (ONNX flavor, signature, input example; ``classmap.csv`` and ``meta.json`` as its extra files: everything
    serving needs). Return the ONNX model's URI, the one the registry registers.

    The PyTorch model is stored in MLflow's ``pt2`` format (``torch.export``): no pickle, so it loads
    without ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` and without importing this project's classes. pt2
    traces with the example and specialises a batch of 1 to a constant, so the example is tiled to a
    batch of at least 2 to keep the batch axis dynamic.
    """
    import mlflow.pytorch
    import torch

    from pipeline.export import MIN_TRACE_BATCH

    onnx_path = Path(onnx_path)
    companions = [Path(artifacts_dir) / CLASSMAP_FILE, Path(artifacts_dir) / META_FILE]
    missing = [str(path) for path in [onnx_path, *companions] if not path.is_file()]
    if missing:
        raise TrackingError(f"cannot log the model: missing {', '.join(missing)} (write the ONNX export, "
                            "class map and meta.json before logging)")
    batch = np.ascontiguousarray(example, dtype=np.float32)
    if len(batch) < MIN_TRACE_BATCH:
        batch = np.concatenate([batch] * MIN_TRACE_BATCH)
    cpu_model = copy.deepcopy(model).to("cpu").eval()
    with torch.no_grad():
        logits = cpu_model(torch.from_numpy(batch)).float().numpy()
    torch_info = mlflow.pytorch.log_model(
        cpu_model,
        name=MODEL_ARTIFACT,
        signature=infer_signature(batch, logits),
        input_example=batch,
        serialization_format="pt2",
        # Explicit pins skip MLflow's requirement inference, which reloads the model in a subprocess.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                          f"numpy=={np.__version__}"],
    )
    onnx_info = log_onnx_model(onnx_path, companions, batch, logits)
    log.info("logged models %s (PyTorch) and %s (ONNX with %s, %s)", torch_info.model_uri, onnx_info,
             CLASSMAP_FILE, META_FILE)
    return onnx_info


def log_onnx_model(onnx_path: Path, companions: Sequence[Path], batch: np.ndarray, logits: np.ndarray) -> str:
    """The served ONNX file as MLflow model ``onnx``: pyfunc predicts ``{"logits": ...}`` with ONNX Runtime."""
    import mlflow.onnx
    import onnx
    import onnxruntime

    with tempfile.TemporaryDirectory() as staging:
        # Extra files keep their names: stage them under the fixed names serving expects.
        staged = []
        for path in companions:
            staged.append(Path(staging) / path.name)
            shutil.copyfile(path, staged[-1])
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)),
            name=ONNX_ARTIFACT,
            signature=infer_signature(batch, {ONNX_OUTPUT: logits}),
            input_example=batch,
            save_as_external_data=False,  # one self-contained model.onnx, as the service loads it
            onnx_execution_providers=["CPUExecutionProvider"],  # as served (the image has no CUDA runtime)
            extra_files=[str(path) for path in staged],
            pip_requirements=[f"onnxruntime=={onnxruntime.__version__}", f"onnx=={onnx.__version__}",
                              f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}"],
        )
    return str(info.model_uri)


def log_params(params: Mapping[str, Any]) -> None:
    """Log plain parameters (e.g. a trial's sampled values) into the active run."""
    mlflow.log_params(dict(params))


def set_tags(tags: Mapping[str, str]) -> None:
    """Set tags on the active run."""
    mlflow.set_tags(dict(tags))


def run_is_active_in(settings: Settings, run_id: str, experiment_id: str) -> bool:
    """Whether ``run_id`` exists, is not deleted and belongs to ``experiment_id`` in the current store."""
    try:
        run = mlflow.MlflowClient(tracking_uri(settings)).get_run(run_id)
    except MlflowException:
        return False
    return run is not None and run.info.lifecycle_stage == "active" and run.info.experiment_id == experiment_id


def fail_trial_runs(settings: Settings, study_name: str, numbers: Sequence[int]) -> None:
    """End FAILED the RUNNING MLflow runs of these trials of ``study_name`` (their process died)."""
    if not numbers:
        return
    client = mlflow.MlflowClient(tracking_uri(settings))
    experiment = client.get_experiment_by_name(settings.mlflow.experiment)
    if experiment is None:
        return
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`optuna.study` = '{study_name}' AND attributes.status = 'RUNNING'",
        max_results=SEARCH_MAX_RESULTS,
    )
    wanted = {str(number) for number in numbers}
    for run in (r for r in runs if r.data.tags.get("optuna.trial") in wanted):
        client.set_tag(run.info.run_id, "optuna.state", "FAIL")
        client.set_tag(run.info.run_id, TAG_FAILURE, "tuning process died")
        client.set_terminated(run.info.run_id, status="FAILED")
