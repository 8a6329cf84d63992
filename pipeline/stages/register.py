"""The register stage: a registry version per evaluated run; the champion alias moves only on a strictly
better test score on the same dataset, a version under the quality floor is rejected and the stage fails."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from pipeline import tracking
from pipeline.config import Settings
from pipeline.contract import (
    CLASSMAP_FILE,
    HEADLINE_METRIC,
    STATUS_PENDING,
    STATUS_READY,
    TAG_STATUS,
    TEST_METRICS,
    TRAIN_RUN_FILE,
    TrainRun,
    load_classmap,
)
from pipeline.files import write_json

log = logging.getLogger(__name__)

REPORT_FILE = "registry.json"

TAG_DECISION = "decision"
TAG_REASON = "decision_reason"
TAG_DATA_DIGEST = "data.digest"
TAG_MD5_PREFIX = "data.md5."
TAG_DVC_DATA = "data.dvc_md5"  # DVC's hash of the download stage's output (paths.raw) in dvc.lock
DVC_LOCK = "dvc.lock"
DOWNLOAD_STAGE = "download"
DECISION_CHAMPION = "champion"
DECISION_CHALLENGER = "challenger"
DECISION_REJECTED = "rejected"


class RegistryError(RuntimeError):
    """The register stage cannot proceed; the message says what to run or change."""


class QualityGateError(RegistryError):
    """The model is registered but rejected: it is not clearly better than chance."""


def quality_floor(settings: Settings, num_classes: int) -> float:
    """The lowest test balanced accuracy a version needs to compete: the configured floor, or by default
    halfway between chance (1 / classes) and a perfect score."""
    configured = settings.registry.min_balanced_accuracy
    if configured is not None:
        return configured
    chance = 1.0 / num_classes
    return chance + (1.0 - chance) / 2


def run(settings: Settings) -> dict[str, Any]:
    """Register stage: new model version from ``models/train_run.json``'s run, then champion/challenger."""
    registry = tracking.ModelRegistry(settings, settings.registered_model_name())
    run_id = TrainRun.read(settings.path("models") / TRAIN_RUN_FILE).run_id
    floor = quality_floor(settings, len(load_classmap(settings.path("models") / CLASSMAP_FILE)))
    train_run = registry.run(run_id)
    if train_run is None:
        raise RegistryError(f"training run {run_id} not found at {tracking.redact(tracking.tracking_uri(settings))}: "
                            "re-run the train stage or point MLFLOW_TRACKING_URI at its store")
    metrics = _test_metrics(train_run)
    base_tags = _version_tags(settings, train_run, metrics)
    registry.ensure_model("SpinalVGG classifiers of cursive hiragana")
    number: str | None = None  # set as soon as the version exists: from then on a failure marks it failed
    try:
        version = registry.existing_version(run_id)
        if version is None:
            version = registry.create_version(run_id, {**base_tags, TAG_STATUS: STATUS_PENDING})
            log.info("registered %s version %s from run %s", registry.name, version.version, run_id)
        else:
            log.info("run %s is already %s version %s: re-deciding its aliases", run_id, registry.name,
                     version.version)
        number = str(version.version)  # MLflow returns int or str depending on the call
        previous = registry.by_alias(settings.registry.champion_alias)
        decision, reason = decide(metrics[HEADLINE_METRIC], base_tags[tracking.TAG_DATASET], number,
                                  previous, settings.registry.champion_alias, floor)
        registry.tag(number, {**base_tags, TAG_DECISION: decision, TAG_REASON: reason},
                     description=describe_version(decision, reason, base_tags, metrics))
        champion_version = _move_aliases(registry, settings, decision, number, previous)
        report = {
            "model_name": registry.name, "version": number, "run_id": run_id, "decision": decision,
            "reason": reason, "alias": _alias_of(settings, decision), "min_balanced_accuracy": floor,
            "champion_version": champion_version,
            "previous_champion_version": str(previous.version) if previous else None,
            f"previous_champion_{HEADLINE_METRIC}": _metric_of(previous), "metrics": metrics,
            "dataset": base_tags[tracking.TAG_DATASET],
            "tracking_uri": tracking.redact(tracking.tracking_uri(settings)),  # no password in a file
        }
        write_json(settings.path("reports") / REPORT_FILE, report)
        registry.tag(number, {TAG_STATUS: STATUS_READY})
    except BaseException as exc:
        if number is not None:
            registry.roll_back(number, exc)
        raise
    log.info("%s version %s: %s (%s)", registry.name, number, decision, reason)
    if decision == DECISION_REJECTED:
        raise QualityGateError(
            f"{registry.name} version {number} is rejected: {reason}. The {settings.registry.champion_alias} "
            f"(v{report['previous_champion_version'] or 'none'}) and the served model are unchanged. Look at "
            "reports/train/history.csv (did validation accuracy rise?), reports/figures/training_curves.png "
            "and reports/figures/augmented_samples.png, and at train.lr / train.epochs in params.yaml")
    return report


def _version_tags(settings: Settings, train_run: Any, metrics: dict[str, float]) -> dict[str, str]:
    """Test metrics, dataset, data checksums and DVC hash, and the training commit: what every version carries."""
    tags = {
        **{key: _fmt(value) for key, value in metrics.items()},
        tracking.TAG_DATASET: train_run.data.tags.get(tracking.TAG_DATASET, settings.data.dataset),
        **_data_tags(settings, train_run),
    }
    if dvc_hash := dvc_data_hash(settings):
        tags[TAG_DVC_DATA] = dvc_hash
    commit = train_run.data.tags.get(tracking.TAG_GIT_COMMIT)
    if commit:
        tags[tracking.TAG_GIT_COMMIT] = commit
    return tags


def _alias_of(settings: Settings, decision: str) -> str:
    aliases = settings.registry
    return {DECISION_CHAMPION: aliases.champion_alias, DECISION_CHALLENGER: aliases.challenger_alias,
            DECISION_REJECTED: aliases.rejected_alias}[decision]


def _move_aliases(registry: tracking.ModelRegistry, settings: Settings, decision: str, number: str,
                  previous: Any | None) -> str | None:
    """Point the decision's alias at ``number``; return the champion version afterwards."""
    aliases = settings.registry
    registry.point(_alias_of(settings, decision), number)
    if decision != DECISION_CHAMPION:
        return str(previous.version) if previous else None
    challenger = registry.by_alias(aliases.challenger_alias)
    if challenger is not None and str(challenger.version) == number:
        registry.point(aliases.challenger_alias, None)  # one version is never both
    return number


def decide(new_value: float, new_dataset: str, new_version: str, champion: Any | None,
           champion_alias: str, floor: float = 0.0) -> tuple[str, str]:
    """(decision, reason): rejected under the quality floor; champion only on a strictly better test
    balanced accuracy on the same data."""
    if new_value < floor:
        return DECISION_REJECTED, (f"{HEADLINE_METRIC} {new_value:.6f} is under the quality floor "
                                   f"{floor:.6f} (registry.min_balanced_accuracy)")
    if champion is None:
        return DECISION_CHAMPION, f"no {champion_alias} yet"
    if str(champion.version) == str(new_version):
        return DECISION_CHAMPION, f"already the {champion_alias}"
    old_dataset = champion.tags.get(tracking.TAG_DATASET)
    if old_dataset and old_dataset != new_dataset:
        return DECISION_CHALLENGER, (
            f"trained on {new_dataset!r} but {champion_alias} v{champion.version} on {old_dataset!r}: scores "
            "are not comparable; check that data.dataset matches the training run"
        )
    old_value = tracking.metric_value(champion.tags.get(HEADLINE_METRIC))
    if old_value is None:
        return DECISION_CHAMPION, (f"{champion_alias} v{champion.version} has no recorded {HEADLINE_METRIC}; "
                                   f"new {new_value:.6f} replaces it")
    if new_value > old_value:
        return DECISION_CHAMPION, (f"{HEADLINE_METRIC} {new_value:.6f} beats {champion_alias} "
                                   f"v{champion.version} ({old_value:.6f})")
    return DECISION_CHALLENGER, (f"{HEADLINE_METRIC} {new_value:.6f} does not beat {champion_alias} "
                                 f"v{champion.version} ({old_value:.6f})")


def _test_metrics(train_run: Any) -> dict[str, float]:
    missing = [key for key in TEST_METRICS if key not in train_run.data.metrics]
    if missing:
        raise RegistryError(f"run {train_run.info.run_id} has no {', '.join(missing)}: run the evaluate "
                            "stage first (`dvc repro evaluate`)")
    values = {key: float(train_run.data.metrics[key]) for key in TEST_METRICS}
    if not all(math.isfinite(value) for value in values.values()):
        raise RegistryError(
            f"run {train_run.info.run_id} has non-finite test metrics {values}; re-run evaluate")
    return values


def _data_tags(settings: Settings, train_run: Any) -> dict[str, str]:
    """Data digest and per-file MD5s from the run's logged training dataset (else the current manifest)."""
    for item in train_run.inputs.dataset_inputs if train_run.inputs else []:
        profile = json.loads(item.dataset.profile or "{}")
        if "files" in profile:
            tags = {TAG_DATA_DIGEST: item.dataset.digest}
            tags.update({f"{TAG_MD5_PREFIX}{file}": info["md5"] for file, info in profile["files"].items()})
            return tags
    from pipeline import data

    manifest = data.read_manifest(settings)  # raises a DataError that says to run the download stage
    return {f"{TAG_MD5_PREFIX}{file}": info["md5"] for file, info in manifest.get("files", {}).items()}


def dvc_data_hash(settings: Settings) -> str | None:
    """DVC's md5 of the raw data folder as dvc.lock records it (None before the first ``dvc repro``)."""
    import yaml

    try:
        lock = yaml.safe_load((settings.root / DVC_LOCK).read_text(encoding="utf-8")) or {}
        outs = lock["stages"][DOWNLOAD_STAGE]["outs"]
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return None
    return next((str(out["md5"]) for out in outs if isinstance(out, dict) and out.get("md5")), None)


def describe_version(decision: str, reason: str, tags: dict[str, str], metrics: dict[str, float]) -> str:
    """The version's description in the registry UI (Markdown): decision, dataset, test metrics, the data
    version and the commit, so a version says what it is without opening its run."""
    scores = ", ".join(f"{key} **{value:.4f}**" for key, value in metrics.items())
    files = ", ".join(f"`{key.removeprefix(TAG_MD5_PREFIX)}` {value}" for key, value in sorted(tags.items())
                      if key.startswith(TAG_MD5_PREFIX))
    data = [f"DVC md5 of the raw data `{tags[TAG_DVC_DATA]}`" if TAG_DVC_DATA in tags else None,
            f"dataset digest `{tags[TAG_DATA_DIGEST]}`" if TAG_DATA_DIGEST in tags else None,
            f"files: {files}" if files else None]
    lines = [f"**{decision}**: {reason}", "", f"- dataset: {tags.get(tracking.TAG_DATASET)}",
             f"- test: {scores}", f"- data version: {'; '.join(part for part in data if part) or 'unknown'}",
             f"- commit: `{tags.get(tracking.TAG_GIT_COMMIT) or 'not in a git checkout'}`"]
    return "\n".join(lines)


def _metric_of(version: Any | None) -> float | None:
    return None if version is None else tracking.metric_value(version.tags.get(HEADLINE_METRIC))


def _fmt(value: float) -> str:
    return repr(float(value))


