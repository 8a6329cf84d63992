"""The package stage: the registry's champion into the BentoML store with where it came from, so a bento
never needs MLflow. ``python -m pipeline.stages.package store`` packages local files (tests, air-gapped hosts)."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import bentoml

from pipeline.config import Settings, load_settings
from pipeline.contract import BENTO_MODEL_REPORT, MODEL_FILES
from pipeline.files import write_json

log = logging.getLogger(__name__)

REPORT_FILE = BENTO_MODEL_REPORT  # under paths.reports (DVC out of the package stage)
LABEL_REGISTRY_VERSION = "registry_version"
LABEL_REGISTRY_MODEL = "registry_model"
LABEL_RUN_ID = "run_id"
LABEL_ONNX_MD5 = "onnx_md5"
# Labels that must all match for the store's latest model to be reused instead of re-imported.
IDENTITY_LABELS = (LABEL_REGISTRY_MODEL, LABEL_REGISTRY_VERSION, LABEL_RUN_ID, LABEL_ONNX_MD5)


class PackageError(RuntimeError):
    """The champion's files are missing or invalid; the message says which and what to do."""


def import_champion(settings: Settings) -> str:
    """Copy the registry champion into the BentoML model store; return the model tag (``name:version``)."""
    from pipeline import tracking  # MLflow is only needed here, not by the service

    with tempfile.TemporaryDirectory(prefix="champion-") as tmp:
        champion = tracking.champion_artifacts(settings, Path(tmp))
        tag = store_model(
            settings,
            onnx_path=Path(champion["onnx"]),
            classmap_path=Path(champion["classmap"]),
            meta_path=Path(champion["meta"]),
            registry_version=str(champion["version"]),
            metrics=champion.get("metrics") or {},
            registry_model=str(champion["model_name"]),
            run_id=str(champion["run_id"]),
        )
    write_report(settings, tag)
    return tag


def store_model(
    settings: Settings,
    *,
    onnx_path: Path,
    classmap_path: Path,
    meta_path: Path,
    registry_version: str,
    metrics: Mapping[str, Any],
    registry_model: str | None = None,
    run_id: str | None = None,
) -> str:
    """Save the three serving files as BentoML model ``serve.bento_model``, or reuse the stored one.

    ``registry_model`` defaults to ``settings.registered_model_name()`` and ``run_id`` to meta.json's.
    Reuses the store's latest model only when its registered model, version, run id and ONNX MD5 all
    match; otherwise creates a new model version (BentoML writes it to a temp dir and moves it into the
    store only when complete).
    """
    sources = dict(zip(MODEL_FILES, (Path(onnx_path), Path(classmap_path), Path(meta_path)), strict=True))
    missing = [str(path) for path in sources.values() if not path.is_file()]
    if missing:
        raise PackageError(f"cannot package the model: missing {', '.join(missing)} (the registry champion's "
                           "onnx/ artifact folder must hold model.onnx, classmap.csv and meta.json)")
    try:
        meta = json.loads(sources["meta.json"].read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"{sources['meta.json']}: not valid JSON ({exc})") from None
    registered = registry_model or settings.registered_model_name()
    run = str(run_id or meta.get("run_id") or "")  # BentoML labels and metadata refuse None
    identity = {
        LABEL_REGISTRY_MODEL: registered,
        LABEL_REGISTRY_VERSION: registry_version,
        LABEL_RUN_ID: run,
        LABEL_ONNX_MD5: _md5_of(sources["model.onnx"]),
    }
    name = settings.serve.bento_model
    latest = latest_model(name)
    if latest is not None and all(latest.info.labels.get(key) == value for key, value in identity.items()):
        log.info("BentoML model %s already holds %s version %s (run %s): reused", latest.tag, registered,
                 registry_version, run or "unknown")
        return str(latest.tag)
    dataset = str(meta.get("dataset", settings.data.dataset))
    labels = {**identity, "dataset": dataset}
    metadata = {
        "registry_model": registered,
        "registry_version": registry_version,
        "dataset": dataset,
        "num_classes": _count_rows(sources["classmap.csv"]),
        # Views the graph averages (model.tta_rotations_deg): each costs one more forward pass per image.
        "tta_rotations_deg": [float(angle) for angle in meta.get("tta_rotations_deg", [])],
        "metrics": {key: float(value) for key, value in metrics.items()},
        "run_id": run,
    }
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        for file_name, source in sources.items():
            shutil.copyfile(source, model.path_of(file_name))
    log.info("saved BentoML model %s (%s version %s)", model.tag, registered, registry_version)
    return str(model.tag)


def latest_model(name: str) -> Any | None:
    """The most recently created model called ``name`` in the BentoML store, or None."""
    try:
        models = bentoml.models.list(name)
    except bentoml.exceptions.NotFound:  # no model of that name yet
        return None
    return max(models, key=lambda model: model.info.creation_time) if models else None


def write_report(settings: Settings, tag: str) -> Path:
    """``reports/bento_model.json``: the stored tag and the registered model, version and run it holds."""
    model = bentoml.models.get(tag)
    path = settings.path("reports") / REPORT_FILE
    report = {
        "tag": tag,
        "registry_model": model.info.metadata.get("registry_model"),
        "registry_version": model.info.labels.get(LABEL_REGISTRY_VERSION),
        "run_id": model.info.metadata.get("run_id"),
        "onnx_md5": model.info.labels.get(LABEL_ONNX_MD5),
        "dataset": model.info.metadata.get("dataset"),
        "metrics": model.info.metadata.get("metrics", {}),
    }
    return write_json(path, report, sort_keys=True)


def _md5_of(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()


def _count_rows(classmap_path: Path) -> int:
    lines = classmap_path.read_text(encoding="utf-8").splitlines()
    return sum(1 for line in lines[1:] if line.strip())  # minus the header


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stages.package", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=None, help="params.yaml to use (default: the project's)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("import", help="registry champion -> BentoML model store (package stage)")
    store = commands.add_parser("store", help="local model.onnx/classmap.csv/meta.json -> BentoML model store")
    store.add_argument("--onnx", type=Path, required=True)
    store.add_argument("--classmap", type=Path, required=True)
    store.add_argument("--meta", type=Path, required=True)
    store.add_argument("--registry-version", required=True, help="version label recorded with the model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = load_settings(args.params)
    if args.command == "import":
        tag = import_champion(settings)
    else:
        tag = store_model(settings, onnx_path=args.onnx, classmap_path=args.classmap, meta_path=args.meta,
                          registry_version=args.registry_version, metrics={})
    print(tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
