"""The one typed configuration object, loaded from ``params.yaml``.

``load_settings()`` reads the file, overlays the selected ``profile``, applies optional dotted
overrides (tuned hyper-parameters, tests) and validates everything with pydantic. Any unknown key or
bad value raises :class:`ConfigError` naming the key, before anything runs.

This module imports only pydantic and PyYAML so the serving image can use it without the training stack.
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = PROJECT_ROOT / "params.yaml"
PARAMS_ENV = "KUZUSHIJI_PARAMS"  # points every entry point at another params file

# Sections a profile may overlay. Data and paths are excluded on purpose: they feed the download and
# prepare stages, and DVC must not re-run those when only a training profile changes.
PROFILE_SECTIONS = ("model", "augment", "train", "tune", "evaluate")

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class ConfigError(ValueError):
    """params.yaml (or an override) is invalid; the message names the key and what is expected."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(_Section):
    raw: Path = Path("data/raw")
    downloads: Path = Path("data/downloads")
    prepared: Path = Path("data/prepared")
    models: Path = Path("models")
    reports: Path = Path("reports")
    checkpoints: Path = Path("checkpoints")
    optuna: Path = Path("optuna")
    mlflow: Path = Path("mlflow")


class DownloadSettings(_Section):
    timeout_s: PositiveFloat = 60.0
    retries: NonNegInt = 5
    backoff_s: Annotated[float, Field(ge=0)] = 2.0


class SyntheticSettings(_Section):
    train_per_class: PositiveInt = 120
    test_per_class: PositiveInt = 30
    seed: int = 0


class DataSettings(_Section):
    dataset: Literal["k49", "kmnist", "local", "synthetic"] = "k49"
    base_url: str | None = None
    local_dir: Path | None = None
    local_prefix: str | None = None  # None: the prefix of the one *_classmap.csv in local_dir
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    download: DownloadSettings = DownloadSettings()
    synthetic: SyntheticSettings = SyntheticSettings()

    @model_validator(mode="after")
    def _local_needs_dir(self) -> DataSettings:
        if self.dataset == "local" and self.local_dir is None:
            prefix = self.local_prefix or "<prefix>"
            raise ValueError(
                "data.dataset is 'local' but data.local_dir is not set: point it at a folder holding "
                f"{prefix}-train-imgs.npz, ... and {prefix}_classmap.csv"
            )
        return self


class ModelSettings(_Section):
    spinal_width: PositiveInt = 128
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5


class AugmentSettings(_Section):
    rotation_deg: Annotated[float, Field(ge=0.0, le=45.0)] = 12.0
    translate_frac: Annotated[float, Field(ge=0.0, le=0.3)] = 0.1
    erasing_prob: Fraction = 0.25


class TrainSettings(_Section):
    epochs: PositiveInt = 60
    batch_size: PositiveInt = 256
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: PositiveFloat = 0.1
    momentum: Fraction = 0.9
    weight_decay: Annotated[float, Field(ge=0.0)] = 5e-4
    schedule: Literal["onecycle", "cosine", "step"] = "onecycle"
    min_steps_per_epoch: NonNegInt = 64
    min_batch_size: PositiveInt = 32
    warmup_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    step_every: PositiveInt = 20
    step_gamma: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    class_balance: Literal["weighted_loss", "sampler", "none"] = "weighted_loss"
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.999
    patience: PositiveInt = 12
    min_delta: Annotated[float, Field(ge=0.0)] = 1e-4
    max_train_per_class: PositiveInt | None = None
    max_val_per_class: PositiveInt | None = None
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    eval_batch_size: PositiveInt = 1024


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
    n_trials: NonNegInt = 30
    timeout_s: PositiveFloat | None = None
    epochs: PositiveInt = 10
    max_train_per_class: PositiveInt | None = 1500
    max_val_per_class: PositiveInt | None = None
    workers: PositiveInt = 1
    study_name: str = "spinalvgg"
    storage: str | None = None
    pruner_startup_trials: NonNegInt = 4
    pruner_warmup_epochs: NonNegInt = 2
    heartbeat_s: PositiveInt = 60
    search_space: dict[str, SearchDimension] = Field(default_factory=dict)

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
                    f"tune.search_space key {key!r}: {section} has no setting {name!r}{_suggest(name, fields)}"
                )
        return self


class EvaluateSettings(_Section):
    batch_size: PositiveInt = 1024
    tta: bool = False
    tta_rotations_deg: list[float] = Field(default_factory=lambda: [-6.0, 0.0, 6.0])
    worst_examples: PositiveInt = 36


class RegistrySettings(_Section):
    model_name: str = "kuzushiji-spinalvgg"
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"
    rejected_alias: str = "rejected"
    min_balanced_accuracy: Fraction | None = None  # None: halfway between chance (1/classes) and 1


class MlflowSettings(_Section):
    experiment: str = "kuzushiji"


class ServeSettings(_Section):
    bento_model: str = "kuzushiji-spinalvgg"
    top_k: PositiveInt = 5
    max_upload_bytes: PositiveInt = 5_000_000
    max_pixels: PositiveInt = 16_000_000
    max_batch_images: PositiveInt = 64
    max_request_bytes: PositiveInt = 32_000_000
    max_batch_size: PositiveInt = 64
    max_latency_ms: PositiveInt = 2000
    request_timeout_s: PositiveInt = 30
    threads: PositiveInt = 2


_SECTION_MODELS: dict[str, type[_Section]] = {
    "model": ModelSettings,
    "augment": AugmentSettings,
    "train": TrainSettings,
}


class Settings(_Section):
    """Validated contents of params.yaml after the profile overlay and overrides."""

    seed: int = 42
    profile: str = "full"
    paths: Paths = Paths()
    data: DataSettings = DataSettings()
    model: ModelSettings = ModelSettings()
    augment: AugmentSettings = AugmentSettings()
    train: TrainSettings = TrainSettings()
    tune: TuneSettings = TuneSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    registry: RegistrySettings = RegistrySettings()
    mlflow: MlflowSettings = MlflowSettings()
    serve: ServeSettings = ServeSettings()
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Directory that relative paths resolve against (the folder holding params.yaml). Not a YAML key.
    root: Path = Field(default=PROJECT_ROOT, exclude=True)

    def path(self, name: str) -> Path:
        """Absolute path of a ``paths`` entry, e.g. ``settings.path("raw")``."""
        relative: Path = getattr(self.paths, name)
        return relative if relative.is_absolute() else self.root / relative

    def registered_model_name(self) -> str:
        """MLflow registered model of this dataset (``registry.model_name`` + ``-`` + ``data.dataset``)."""
        return f"{self.registry.model_name}-{self.data.dataset}"

    def resolved(self) -> dict[str, Any]:
        """Plain dict of the effective settings (for logging to MLflow), without the profile table."""
        return self.model_dump(mode="json", exclude={"profiles", "root"})

    def with_overrides(self, overrides: dict[str, Any]) -> Settings:
        """A copy with dotted-key overrides applied (e.g. tuned hyper-parameters), re-validated."""
        raw = self.model_dump(mode="python", exclude={"root"})
        _apply_dotted(raw, overrides, source="override")
        return _validate(raw, root=self.root, source="override")


def load_settings(
    path: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Load ``params.yaml`` (or ``$KUZUSHIJI_PARAMS``), apply the profile and dotted overrides, validate."""
    params_path = Path(path or os.environ.get(PARAMS_ENV) or DEFAULT_PARAMS).resolve()
    try:
        raw = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{params_path}: file not found (set ${PARAMS_ENV} or pass a path)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{params_path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{params_path}: expected a mapping of settings at the top level")
    # Every profile must be valid now, not only when someone first selects it.
    for name in raw.get("profiles") or {}:
        if name != raw.get("profile", "full"):
            _validate(_apply_profile({**raw, "profile": name}, params_path), root=params_path.parent,
                      source=f"{params_path} (profile {name!r})")
    raw = _apply_profile(raw, params_path)
    if overrides:  # after the overlay: an explicit override wins over the profile
        _apply_dotted(raw, overrides, source=str(params_path))
    return _validate(raw, root=params_path.parent, source=str(params_path))


def _apply_profile(raw: dict[str, Any], source: Path) -> dict[str, Any]:
    profiles = raw.get("profiles") or {}
    name = raw.get("profile", "full")
    if not isinstance(profiles, dict):
        raise ConfigError(f"{source}: 'profiles' must be a mapping of profile name -> overlay")
    if name not in profiles:
        known = ", ".join(sorted(profiles)) or "none defined"
        raise ConfigError(f"{source}: profile {name!r} is not defined under 'profiles' (known: {known})")
    for profile_name, profile_overlay in profiles.items():
        for section in profile_overlay or {}:
            if section not in PROFILE_SECTIONS:
                raise ConfigError(
                    f"{source}: profiles.{profile_name}.{section}: a profile may only overlay "
                    f"{', '.join(PROFILE_SECTIONS)} (data and paths feed stages that must not re-run per profile)"
                )
    overlay = profiles[name] or {}
    merged = copy.deepcopy(raw)
    _deep_merge(merged, overlay)
    return merged


def _deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> None:
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def _apply_dotted(raw: dict[str, Any], overrides: dict[str, Any], source: str) -> None:
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: cannot set {dotted!r}: {part!r} is not a section")
            node = child
        node[leaf] = value


def _validate(raw: dict[str, Any], root: Path, source: str) -> Settings:
    try:
        return Settings.model_validate({**raw, "root": root})
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source)) from None


def _explain(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid settings"]
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            parent_loc, name = error["loc"][:-1], str(error["loc"][-1])
            lines.append(f"  {key}: unknown key{_suggest(name, _known_fields(parent_loc))}")
        else:
            lines.append(f"  {key or '(top level)'}: {error['msg']} (got {error.get('input')!r})")
    return "\n".join(lines)


def _known_fields(loc: tuple[Any, ...]) -> list[str]:
    model: Any = Settings
    for part in loc:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return [name for name in model.model_fields if name != "root"]


def _suggest(name: str, candidates: Any) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""
