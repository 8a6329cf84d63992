"""Every MLflow call of the pipeline: where runs are stored, run lifecycle, params, data, metrics, models.

The tracking URI is ``$MLFLOW_TRACKING_URI`` when set (a shared server), else a SQLite database under
``paths.mlflow`` (MLflow 3 refuses the old ``./mlruns`` file store) with artifacts next to it, so a clone
of the project tracks locally with no server.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import numpy as np
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode

from pipeline.config import PROJECT_ROOT, Settings
from pipeline.contract import (
    CLASSMAP_FILE,
    META_FILE,
    ONNX_FILE,
    STATUS_READY,
    TAG_STATUS,
    TEST_METRICS,
)

log = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
# URI schemes served by a tracking server that owns its artifact store; anything else is local here.
REMOTE_SCHEMES = ("http", "https", "databricks")
# Shared databases MLflow can use directly as its tracking store (SQLAlchemy dialects, any driver).
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")
# A tracking server that does not accept a connection within this many seconds counts as down.
REACHABLE_TIMEOUT_S = 10.0

# Run artifact folders. The ONNX folder is what the registry hands to serving (pipeline/registry.py).
MODEL_ARTIFACT = "model"
ONNX_ARTIFACT = "onnx"

# Tag keys shared by train/evaluate/register.
TAG_STAGE = "stage"
TAG_DATASET = "dataset"
TAG_PROFILE = "profile"
TAG_GIT_COMMIT = "git_commit"
TAG_MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"
TAG_FAILURE = "failure_reason"
FAILURE_TAG_MAX_CHARS = 5000  # MLflow tag values are limited (8000 chars); keep the head of the message
# Digest length of the logged dataset (MLflow stores at most 36 characters).
DATASET_DIGEST_CHARS = 16
# MLflow rejects param values longer than this; longer settings (search space lists) are truncated.
PARAM_VALUE_MAX_CHARS = 6000


class TrackingError(RuntimeError):
    """MLflow is not usable as configured; the message says what to change."""


# mlflow.set_tracking_uri() also exports $MLFLOW_TRACKING_URI (for child processes). Remember the local
# default that configure() computed and mlflow copied there, so a later configure() for another settings
# root is not mistaken for a user's choice. None while the URI in use is the user's own.
_uri_set_here: str | None = None


def tracking_uri(settings: Settings) -> str:
    """``$MLFLOW_TRACKING_URI`` if the user set it, else ``sqlite:///<abs paths.mlflow>/mlflow.db``."""
    env = os.environ.get(TRACKING_URI_ENV, "").strip()
    if env and env != _uri_set_here:
        return env
    return f"sqlite:///{settings.path('mlflow').resolve() / DB_FILE}"


def is_remote(uri: str) -> bool:
    """True when ``uri`` points at a tracking server (which then chooses where artifacts go)."""
    return urlparse(uri).scheme in REMOTE_SCHEMES


def redact(uri: str) -> str:
    """``uri`` with its password (if any) replaced by ``***``: safe for messages and logs."""
    parsed = urlparse(uri)
    if parsed.password is None:
        return uri
    host = parsed.netloc.rpartition("@")[2]
    return parsed._replace(netloc=f"{parsed.username}:***@{host}").geturl()


# URIs already found reachable by this process: configure() runs before every run, check once.
_reachable: set[str] = set()


def check_reachable(uri: str) -> None:
    """Fail fast, naming ``MLFLOW_TRACKING_URI``, when a shared tracking store cannot be reached.

    Without this MLflow retries a database connection for ~100 s and an HTTP request for minutes
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``) and then reports a driver error. A database is checked with
    one real connection (server down, wrong password, missing database); a server with one HTTP request
    (any answer counts: authentication is the server's business).
    """
    scheme = urlparse(uri).scheme
    if uri in _reachable or not (scheme in ("http", "https") or scheme.split("+")[0] in DATABASE_SCHEMES):
        return
    fix = (f"Start it or fix {TRACKING_URI_ENV} (a database password may also come from the driver's "
           "usual setting, e.g. PGPASSWORD for PostgreSQL).")
    if scheme in ("http", "https"):
        import httpx

        try:
            # Only whether a server answers at all: no data is sent, so the certificate is MLflow's concern
            # (MLFLOW_TRACKING_SERVER_CERT_PATH, MLFLOW_TRACKING_INSECURE_TLS), not this check's.
            httpx.get(uri, timeout=REACHABLE_TIMEOUT_S, verify=False)
        except httpx.HTTPError as exc:
            raise TrackingError(f"MLflow tracking server {redact(uri)} is not reachable ({exc!r}). {fix}") from exc
    else:
        import sqlalchemy

        try:
            engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
            try:
                with engine.connect():
                    pass
            finally:
                engine.dispose()
        except ImportError as exc:
            raise TrackingError(f"no database driver for {TRACKING_URI_ENV}={redact(uri)} ({exc}): install the "
                                "pinned lock (`make venv`)") from exc
        except sqlalchemy.exc.SQLAlchemyError as exc:
            reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
            raise TrackingError(f"cannot connect to the MLflow tracking database {redact(uri)}: {reason}. "
                                f"{fix}") from exc
    _reachable.add(uri)


def configure(settings: Settings) -> str:
    """Point MLflow at the tracking store and experiment of ``settings``; return the experiment id.

    A shared store that cannot be reached raises :class:`TrackingError` naming ``MLFLOW_TRACKING_URI``.
    """
    global _uri_set_here
    uri = tracking_uri(settings)
    env = os.environ.get(TRACKING_URI_ENV, "").strip()
    user_set = bool(env) and env != _uri_set_here
    if not is_remote(uri):
        settings.path("mlflow").mkdir(parents=True, exist_ok=True)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    _uri_set_here = None if user_set else uri
    client = mlflow.MlflowClient(uri)
    name = settings.mlflow.experiment
    try:
        experiment = client.get_experiment_by_name(name)
    except MlflowException as exc:
        raise TrackingError(f"MLflow tracking store {redact(uri)} did not answer: {exc.message}. Check the "
                            f"server or fix {TRACKING_URI_ENV}.") from exc
    if experiment is None:
        location = None if is_remote(uri) else (settings.path("mlflow").resolve() / ARTIFACTS_DIR).as_uri()
        try:
            experiment_id = client.create_experiment(name, artifact_location=location)
        except MlflowException as exc:
            # Another process (parallel tuning worker) created it first: use theirs.
            if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
            experiment_id = experiment.experiment_id
    elif experiment.lifecycle_stage != "active":
        raise TrackingError(
            f"MLflow experiment {name!r} at {uri} is deleted. Restore it "
            f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) or set "
            "mlflow.experiment to a new name in params.yaml."
        )
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def git_commit(root: Path) -> str | None:
    """The checked-out commit of the git repository holding ``root``, or None outside git."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def default_tags(settings: Settings, stage: str) -> dict[str, str]:
    """Tags every new run carries: stage, dataset, profile and (in a git checkout) the commit."""
    tags = {TAG_STAGE: stage, TAG_DATASET: settings.data.dataset, TAG_PROFILE: settings.profile}
    commit = git_commit(PROJECT_ROOT)
    if commit:
        tags[TAG_GIT_COMMIT] = commit
        tags[TAG_MLFLOW_GIT_COMMIT] = commit
    return tags


@contextmanager
def start_run(
    settings: Settings,
    run_name: str,
    *,
    run_id: str | None = None,
    nested: bool = False,
    tags: dict[str, str] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start a new run (or resume ``run_id``) in the configured experiment and always end it.

    A new run is tagged with :func:`default_tags` (``run_name`` is the stage); a resumed run keeps its
    tags and only gets ``tags``. If the body raises, the run ends ``FAILED`` (``KILLED`` on Ctrl-C) with
    the reason in the ``failure_reason`` tag, and the exception propagates.
    """
    experiment_id = configure(settings)
    run_tags = dict(tags or {}) if run_id else {**default_tags(settings, run_name), **(tags or {})}
    try:
        active = mlflow.start_run(
            run_id=run_id,
            experiment_id=None if run_id else experiment_id,
            run_name=None if run_id else run_name,
            nested=nested,
            tags=run_tags or None,
        )
    except MlflowException as exc:
        if run_id:
            raise TrackingError(
                f"cannot resume MLflow run {run_id} at {tracking_uri(settings)}: {exc.message}. "
                "Re-run the train stage (it writes models/train_run.json) or point MLFLOW_TRACKING_URI "
                "at the store that holds the run."
            ) from exc
        raise
    try:
        yield active
    except BaseException as exc:
        status = RunStatus.KILLED if isinstance(exc, KeyboardInterrupt) else RunStatus.FAILED
        try:
            reason = f"{type(exc).__name__}: {exc}"[:FAILURE_TAG_MAX_CHARS]
            mlflow.set_tag(TAG_FAILURE, reason)
        finally:
            mlflow.end_run(RunStatus.to_string(status))
        raise
    else:
        mlflow.end_run()


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
    """Log the PyTorch model under ``model`` and the serving files under ``onnx``; return the model URI.

    The PyTorch model is stored in MLflow's ``pt2`` format (``torch.export``): no pickle, so it loads
    without ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` and without importing this project's classes. pt2
    traces with the example and specialises a batch of 1 to a constant, so the example is tiled to a
    batch of at least 2 to keep the batch axis dynamic. ``onnx/`` holds ``model.onnx`` plus
    ``classmap.csv`` and ``meta.json`` from ``artifacts_dir``: everything serving needs.
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
    info = mlflow.pytorch.log_model(
        cpu_model,
        name=MODEL_ARTIFACT,
        signature=infer_signature(batch, logits),
        input_example=batch,
        serialization_format="pt2",
        # Explicit pins skip MLflow's requirement inference, which reloads the model in a subprocess.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                          f"numpy=={np.__version__}"],
    )
    with tempfile.TemporaryDirectory() as staging:
        # Stage under the fixed names serving expects, whatever the local file names are.
        folder = Path(staging)
        shutil.copyfile(onnx_path, folder / ONNX_FILE)
        for path in companions:
            shutil.copyfile(path, folder / path.name)
        mlflow.log_artifacts(str(folder), artifact_path=ONNX_ARTIFACT)
    log.info("logged model %s and %s/ (%s, %s, %s)", info.model_uri, ONNX_ARTIFACT, ONNX_FILE,
             CLASSMAP_FILE, META_FILE)
    return info.model_uri


# --------------------------------------------------------------------------- the registry's champion


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
