"""The register stage: put the evaluated training run's model in the MLflow Model Registry.

Every version carries its test metrics, dataset, data checksums and git commit as tags. The champion
alias (what serving deploys) moves only when the new version's test balanced accuracy is strictly better
than the current champion's on the same dataset; otherwise the version becomes the challenger and the
reason is recorded. Each dataset has its own registered model (``Settings.registered_model_name()``), so
a synthetic smoke run never competes with, or gets served instead of, a K49 model. A version is created
with ``status=pending`` and flipped to ``ready`` as the very last step; on any failure after it exists the
alias change is rolled back and the version is tagged ``status=failed`` with the reason.

A quality gate comes first: a version whose test balanced accuracy is under ``registry.min_balanced_accuracy``
(default: halfway between chance, 1/classes, and 1) is registered but tagged ``decision=rejected``, gets the
``rejected`` alias and nothing else; the stage then fails, so the pipeline stops before packaging and the
champion and the served model stay as they were.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from pipeline import tracking
from pipeline.config import Settings
from pipeline.contract import (
    CLASSMAP_FILE,
    HEADLINE_METRIC,
    STATUS_FAILED,
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


def _client(settings: Settings) -> mlflow.MlflowClient:
    tracking.configure(settings)
    uri = tracking.tracking_uri(settings)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _is(exc: MlflowException, code: int) -> bool:
    return exc.error_code == ErrorCode.Name(code)


def run(settings: Settings) -> dict[str, Any]:
    """Register stage: new model version from ``models/train_run.json``'s run, then champion/challenger."""
    client = _client(settings)
    name = settings.registered_model_name()
    run_id = TrainRun.read(settings.path("models") / TRAIN_RUN_FILE).run_id
    floor = quality_floor(settings, len(load_classmap(settings.path("models") / CLASSMAP_FILE)))
    try:
        train_run = client.get_run(run_id)
    except MlflowException as exc:
        raise RegistryError(f"training run {run_id} not found at {tracking.redact(tracking.tracking_uri(settings))}: "
                            "re-run the train stage or point MLFLOW_TRACKING_URI at its store") from exc
    metrics = _test_metrics(train_run)
    base_tags = {
        **{key: _fmt(value) for key, value in metrics.items()},
        tracking.TAG_DATASET: train_run.data.tags.get(tracking.TAG_DATASET, settings.data.dataset),
        **_data_tags(settings, train_run),
    }
    commit = train_run.data.tags.get(tracking.TAG_GIT_COMMIT)
    if commit:
        base_tags[tracking.TAG_GIT_COMMIT] = commit

    _ensure_registered_model(client, name)
    aliases = settings.registry
    number: str | None = None  # set as soon as the version exists: from then on a failure marks it failed
    undo: list[tuple[str, str | None]] = []  # (alias, version it pointed to before this stage)

    def point(alias: str, target: str | None) -> None:
        current = tracking.version_by_alias(client, name, alias)
        before = str(current.version) if current else None
        if before == target:
            return
        undo.append((alias, before))
        if target is None:
            client.delete_registered_model_alias(name, alias)
        else:
            client.set_registered_model_alias(name, alias, target)

    try:
        version = _existing_version(client, name, run_id)
        if version is None:
            version = _create_version(client, name, run_id, {**base_tags, TAG_STATUS: STATUS_PENDING})
            log.info("registered %s version %s from run %s", name, version.version, run_id)
        else:
            log.info("run %s is already %s version %s: re-deciding its aliases", run_id, name,
                     version.version)
        number = str(version.version)  # MLflow returns int or str depending on the call
        previous = tracking.version_by_alias(client, name, aliases.champion_alias)
        previous_number = str(previous.version) if previous else None
        for key, value in base_tags.items():
            client.set_model_version_tag(name, number, key, value)
        decision, reason = decide(metrics[HEADLINE_METRIC], base_tags[tracking.TAG_DATASET], number,
                                  previous, aliases.champion_alias, floor)
        client.set_model_version_tag(name, number, TAG_DECISION, decision)
        client.set_model_version_tag(name, number, TAG_REASON, reason)
        client.update_model_version(name, number, description=f"{decision}: {reason}")
        if decision == DECISION_REJECTED:
            point(aliases.rejected_alias, number)
            champion_version = previous_number
        elif decision == DECISION_CHAMPION:
            point(aliases.champion_alias, number)
            challenger = tracking.version_by_alias(client, name, aliases.challenger_alias)
            if challenger is not None and str(challenger.version) == number:
                point(aliases.challenger_alias, None)  # one version is never both
            champion_version = number
        else:
            point(aliases.challenger_alias, number)
            champion_version = previous_number
        report = {
            "model_name": name,
            "version": number,
            "run_id": run_id,
            "decision": decision,
            "reason": reason,
            "alias": {DECISION_CHAMPION: aliases.champion_alias, DECISION_CHALLENGER: aliases.challenger_alias,
                      DECISION_REJECTED: aliases.rejected_alias}[decision],
            "min_balanced_accuracy": floor,
            "champion_version": champion_version,
            "previous_champion_version": previous_number,
            f"previous_champion_{HEADLINE_METRIC}": _metric_of(previous),
            "metrics": metrics,
            "dataset": base_tags[tracking.TAG_DATASET],
            "tracking_uri": tracking.redact(tracking.tracking_uri(settings)),  # no password in a file
        }
        write_json(settings.path("reports") / REPORT_FILE, report)
        client.set_model_version_tag(name, number, TAG_STATUS, STATUS_READY)
    except BaseException as exc:
        if number is not None:
            _roll_back(client, name, number, undo, exc)
        raise
    log.info("%s version %s: %s (%s)", name, number, decision, reason)
    if decision == DECISION_REJECTED:
        raise QualityGateError(
            f"{name} version {number} is rejected: {reason}. The {aliases.champion_alias} "
            f"(v{previous_number or 'none'}) and the served model are unchanged. Look at "
            "reports/train/history.csv (did validation accuracy rise?), reports/figures/training_curves.png "
            "and reports/figures/augmented_samples.png, and at train.lr / train.epochs in params.yaml")
    return report


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


# ------------------------------------------------------------------------------------------ helpers


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


def _ensure_registered_model(client: mlflow.MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name, description="SpinalVGG classifiers of cursive hiragana")
    except MlflowException as exc:
        if not _is(exc, RESOURCE_ALREADY_EXISTS):
            raise


def _create_version(client: mlflow.MlflowClient, name: str, run_id: str, tags: dict[str, str]) -> Any:
    """Register the run's model as a new version of ``name``.

    ``mlflow.register_model`` creates the version and then waits for it to become READY; when it fails in
    that wait (or is interrupted) the version exists but was never returned. The version it created is
    then looked up and marked failed, so no ``pending`` version is left behind.
    """
    before = {str(v.version) for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")}
    try:
        return mlflow.register_model(f"runs:/{run_id}/{tracking.MODEL_ARTIFACT}", name, tags=tags)
    except BaseException as exc:
        try:
            created = [v for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
                       if str(v.version) not in before]
        except Exception:  # the registry is down: the original error is the one to report
            log.exception("could not look up the %s version being created from run %s", name, run_id)
            created = []
        for version in created:
            _roll_back(client, name, str(version.version), [], exc)
        raise


def _existing_version(client: mlflow.MlflowClient, name: str, run_id: str) -> Any | None:
    """A usable version already registered from ``run_id`` (re-running the stage must not duplicate it)."""
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    usable = [v for v in versions if v.tags.get(TAG_STATUS) != STATUS_FAILED]
    return max(usable, key=lambda v: int(v.version)) if usable else None


def _metric_of(version: Any | None) -> float | None:
    return None if version is None else tracking.metric_value(version.tags.get(HEADLINE_METRIC))


def _roll_back(client: mlflow.MlflowClient, name: str, version: str, undo: list[tuple[str, str | None]],
               error: BaseException) -> None:
    """Restore the aliases this stage moved and mark the version failed; never mask the original error."""
    try:
        for alias, before in reversed(undo):
            if before is None:
                client.delete_registered_model_alias(name, alias)
            else:
                client.set_registered_model_alias(name, alias, before)
        client.set_model_version_tag(name, version, TAG_STATUS, STATUS_FAILED)
        client.set_model_version_tag(name, version, tracking.TAG_FAILURE,
                                     f"{type(error).__name__}: {error}"[: tracking.FAILURE_TAG_MAX_CHARS])
    except Exception:  # the registry itself is down: the original error is the one to report
        log.exception("could not mark %s version %s as failed", name, version)


def _fmt(value: float) -> str:
    return repr(float(value))


