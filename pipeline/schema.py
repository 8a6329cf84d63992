"""The sections of the typed configuration (one pydantic model each): what every knob may hold. Loaded
and composed by ``pipeline.config``, which is the one entry point; no torch, so serving carries it."""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]



def suggest(name: str, candidates: Any) -> str:
    """`` (did you mean 'x'?)`` for the closest known name, or nothing."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


class ConfigError(ValueError):
    """params.yaml (or an override) is invalid; the message names the key and what is expected."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(_Section):
    raw: Path
    downloads: Path
    prepared: Path
    models: Path
    reports: Path
    checkpoints: Path
    optuna: Path
    mlflow: Path
    feedback: Path


class DownloadSettings(_Section):
    timeout_s: PositiveFloat
    retries: NonNegInt
    backoff_s: Annotated[float, Field(ge=0)]


class SyntheticSettings(_Section):
    train_per_class: PositiveInt
    test_per_class: PositiveInt
    seed: int


class DataSettings(_Section):
    dataset: Literal["k49", "kmnist", "local", "synthetic"]
    base_url: str | None
    local_dir: Path | None
    local_prefix: str | None  # None: the prefix of the one *_classmap.csv in local_dir
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)]
    download: DownloadSettings
    synthetic: SyntheticSettings

    @model_validator(mode="after")
    def _local_needs_dir(self) -> DataSettings:
        if self.dataset == "local" and self.local_dir is None:
            prefix = self.local_prefix or "<prefix>"
            raise ValueError(
                "data.dataset is 'local' but data.local_dir is not set: point it at a folder holding "
                f"{prefix}-train-imgs.npz, ... and {prefix}_classmap.csv"
            )
        return self


# Test-time views: each costs the served model one more forward pass; beyond the training rotation a view
# shows the model glyphs it never saw.
MAX_TTA_VIEWS = 8
TTA_MAX_DEG = 30.0


class ModelSettings(_Section):
    spinal_width: PositiveInt
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)]
    tta_rotations_deg: Annotated[list[Annotated[float, Field(ge=-TTA_MAX_DEG, le=TTA_MAX_DEG)]],
                                 Field(max_length=MAX_TTA_VIEWS)]

    @model_validator(mode="after")
    def _distinct_views(self) -> ModelSettings:
        angles = self.tta_rotations_deg
        if len(set(angles)) != len(angles):
            raise ValueError(f"model.tta_rotations_deg {angles} lists an angle twice: each view must differ "
                             "(e.g. [-6.0, 0.0, 6.0]; [] for the image alone)")
        return self


class AugmentSettings(_Section):
    rotation_deg: Annotated[float, Field(ge=0.0, le=45.0)]
    translate_frac: Annotated[float, Field(ge=0.0, le=0.3)]
    erasing_prob: Fraction
    elastic_px: Annotated[float, Field(ge=0.0, le=4.0)]


class TrainSettings(_Section):
    epochs: PositiveInt
    batch_size: PositiveInt
    optimizer: Literal["sgd", "adamw"]
    lr: PositiveFloat
    momentum: Fraction
    weight_decay: Annotated[float, Field(ge=0.0)]
    schedule: Literal["onecycle", "cosine", "step"]
    min_steps_per_epoch: NonNegInt
    min_batch_size: PositiveInt
    warmup_fraction: Annotated[float, Field(ge=0.0, lt=1.0)]
    step_every: PositiveInt
    step_gamma: Annotated[float, Field(gt=0.0, le=1.0)]
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)]
    class_balance: Literal["weighted_loss", "sampler", "none"]
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)]
    patience: PositiveInt
    refit: bool
    refit_start: Literal["validated", "scratch"]
    refit_epochs_fraction: Annotated[float, Field(gt=0.0, le=1.0)]
    min_delta: Annotated[float, Field(ge=0.0)]
    max_train_per_class: PositiveInt | None
    max_val_per_class: PositiveInt | None
    device: Literal["auto", "cuda", "mps", "cpu"]
    amp: bool
    channels_last: bool
    compile: bool
    eval_batch_size: PositiveInt

    def refit_epochs(self, validated_epochs: int) -> int:
        """The refit's length: ``refit_epochs_fraction`` of the validated run's epochs, rounded up."""
        return max(1, math.ceil(self.refit_epochs_fraction * validated_epochs))


class SearchDimension(_Section):
    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _complete(self) -> SearchDimension:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical dimension needs a non-empty 'choices' list")
        else:
            if self.low is None or self.high is None or self.low >= self.high:
                raise ValueError(f"a {self.type} dimension needs 'low' < 'high'")
            if self.log and self.low <= 0:
                raise ValueError("a log-scaled dimension needs 'low' > 0")
        return self


class TuneSettings(_Section):
    n_trials: NonNegInt
    timeout_s: PositiveFloat | None
    epochs: PositiveInt
    max_train_per_class: PositiveInt | None
    max_val_per_class: PositiveInt | None
    workers: PositiveInt
    study_name: str
    storage: str | None
    pruner_startup_trials: NonNegInt
    pruner_warmup_epochs: NonNegInt
    heartbeat_s: PositiveInt
    search_space: dict[str, SearchDimension]

    @model_validator(mode="after")
    def _tunable_keys(self) -> TuneSettings:
        for key in self.search_space:
            section, _, name = key.partition(".")
            if section not in ("model", "augment", "train") or not name:
                raise ValueError(
                    f"tune.search_space key {key!r} must be 'model.X', 'augment.X' or 'train.X'"
                )
            fields = _SECTION_MODELS[section].model_fields
            if name not in fields:
                raise ValueError(
                    f"tune.search_space key {key!r}: {section} has no setting {name!r}{suggest(name, fields)}"
                )
        return self


class EvaluateSettings(_Section):
    batch_size: PositiveInt
    worst_examples: PositiveInt
    # Fitted by the train stage on validation, reported by evaluate (pipeline.trust): the accuracy the
    # "confident" answers must keep, and the share of real kana allowed to be called "not a kana".
    answered_accuracy: Fraction
    ood_false_alarm: Fraction


    @model_validator(mode="before")
    @classmethod
    def _tta_moved(cls, values: Any) -> Any:
        """Test-time views moved into the exported model, so that what is evaluated is what is served."""
        moved = [key for key in ("tta", "tta_rotations_deg") if isinstance(values, Mapping) and key in values]
        if moved:
            raise ConfigError(f"evaluate.{moved[0]} moved: test-time augmentation is now in the exported model "
                              "(ONNX too); set model.tta_rotations_deg, e.g. [-6.0, 0.0, 6.0] (or [] for none)")
        return values

class RegistrySettings(_Section):
    model_name: str
    champion_alias: str
    challenger_alias: str
    rejected_alias: str
    min_balanced_accuracy: Fraction | None  # None: halfway between chance (1/classes) and 1


class MlflowSettings(_Section):
    experiment: str


class FeedbackSettings(_Section):
    store: str  # a SQLite file (relative to the project root) or a database URL
    store_timeout_s: PositiveFloat
    accept: Literal["reviewed", "all"]
    min_new: PositiveInt
    rate_per_minute: PositiveFloat
    rate_burst: PositiveInt


SERVE_RENAMED = {"max_batch_size": "engine_max_batch", "max_batch_images": "max_images_per_request"}


class ServeSettings(_Section):
    bento_model: str
    top_k: PositiveInt
    max_upload_bytes: PositiveInt
    max_pixels: PositiveInt
    max_pixels_per_request: PositiveInt
    max_images_per_request: PositiveInt
    max_request_bytes: PositiveInt
    engine_max_batch: PositiveInt
    request_timeout_s: PositiveInt
    worker_body_budget_bytes: PositiveInt
    queue_timeout_s: PositiveFloat
    body_idle_timeout_s: PositiveFloat
    header_timeout_s: PositiveFloat
    keepalive_timeout_s: PositiveInt
    max_header_bytes: PositiveInt
    max_headers: PositiveInt
    threads: PositiveInt
    reload_follow_s: PositiveFloat
    reload_poll_s: Annotated[float, Field(ge=0)]

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values: Any) -> Any:
        """Limits renamed by role: name the new key rather than report a bare 'unknown key'."""
        renamed = [old for old in SERVE_RENAMED if isinstance(values, Mapping) and old in values]
        if renamed:
            raise ConfigError("; ".join(f"serve.{old} was renamed serve.{SERVE_RENAMED[old]}" for old in renamed))
        return values


_SECTION_MODELS: dict[str, type[_Section]] = {
    "model": ModelSettings,
    "augment": AugmentSettings,
    "train": TrainSettings,
}
