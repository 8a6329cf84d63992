"""The one typed configuration: ``conf/`` (one default per knob, profiles on top) composed by Hydra into
params.yaml, validated by pydantic so a bad key fails before anything runs. No torch: serving uses it."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from pipeline.schema import (  # the sections, re-exported: pipeline.config is the one entry point
    AugmentSettings as AugmentSettings,
)
from pipeline.schema import (
    ConfigError as ConfigError,
)
from pipeline.schema import (
    DataSettings as DataSettings,
)
from pipeline.schema import (
    DownloadSettings as DownloadSettings,
)
from pipeline.schema import (
    EvaluateSettings as EvaluateSettings,
)
from pipeline.schema import (
    FeedbackSettings as FeedbackSettings,
)
from pipeline.schema import (
    MlflowSettings as MlflowSettings,
)
from pipeline.schema import (
    ModelSettings as ModelSettings,
)
from pipeline.schema import (
    Paths as Paths,
)
from pipeline.schema import (
    RegistrySettings as RegistrySettings,
)
from pipeline.schema import (
    SearchDimension as SearchDimension,
)
from pipeline.schema import (
    ServeSettings as ServeSettings,
)
from pipeline.schema import (
    SyntheticSettings as SyntheticSettings,
)
from pipeline.schema import (
    TrainSettings as TrainSettings,
)
from pipeline.schema import (
    TuneSettings as TuneSettings,
)
from pipeline.schema import (
    _Section,
    suggest,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = PROJECT_ROOT / "params.yaml"
PARAMS_ENV = "KUZUSHIJI_PARAMS"  # points every entry point at another params file

# Hydra composition (DVC's, enabled in .dvc/config): conf/config.yaml holds every knob's one default,
# conf/profile/<name>.yaml overlays a profile; `dvc exp run -S` composes them into params.yaml.
CONF_DIR = "conf"
CONF_NAME = "config"
CONFIG_GROUPS = frozenset({"profile"})



class Settings(_Section):
    """Validated contents of params.yaml: every knob, as composed for this run."""

    seed: int
    profile: str
    paths: Paths
    data: DataSettings
    model: ModelSettings
    augment: AugmentSettings
    train: TrainSettings
    tune: TuneSettings
    evaluate: EvaluateSettings
    registry: RegistrySettings
    mlflow: MlflowSettings
    serve: ServeSettings
    feedback: FeedbackSettings
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
        """Plain dict of the effective settings (for logging to MLflow)."""
        return self.model_dump(mode="json", exclude={"root"})

    def with_overrides(self, overrides: dict[str, Any]) -> Settings:
        """A copy with dotted-key overrides applied (e.g. tuned hyper-parameters), re-validated."""
        raw = self.model_dump(mode="python", exclude={"root"})
        apply_dotted(raw, overrides, source="override")
        return _validate(raw, root=self.root, source="override")

    def run_identity(self, *sections: str) -> dict[str, Any]:
        """The values of ``sections`` that decide a run's result: :data:`RUNTIME_KEYS` left out."""
        resolved = self.resolved()
        return {section: ({key: value for key, value in resolved[section].items()
                           if f"{section}.{key}" not in RUNTIME_KEYS}
                          if isinstance(resolved[section], dict) else resolved[section])
                for section in sections}


# The one answer to "which settings define a run": everything in the recipe sections except these keys,
# which only say where and how fast it runs (or, for the subsets, are covered by the data's own digest).
# The training checkpoint's fingerprint and the Optuna study's identity both use Settings.run_identity;
# tests/test_config.py checks that dvc.yaml's stages depend on the recipe sections they read.
RUNTIME_KEYS = frozenset({
    "train.device", "train.compile", "train.eval_batch_size",
    "train.max_train_per_class", "train.max_val_per_class",  # the data digest covers the subset
    "tune.n_trials", "tune.timeout_s", "tune.workers", "tune.study_name", "tune.storage", "tune.heartbeat_s",
})
RECIPE_SECTIONS = ("seed", "model", "augment", "train")


# ------------------------------------------------------------------------------------------ loading


def load_settings(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
) -> Settings:
    """The settings of a run.

    Without ``overrides``: ``params.yaml`` (or ``$KUZUSHIJI_PARAMS``) as it is, which after ``dvc exp
    run`` holds the composed values. With ``overrides``: composed afresh from ``conf/`` exactly as ``dvc
    exp run -S`` does (defaults < profile < overrides), e.g. ``{"profile": "quick", "train.epochs": 2}``.
    """
    params_path = Path(path or os.environ.get(PARAMS_ENV) or DEFAULT_PARAMS).resolve()
    if overrides:
        raw = compose(overrides, conf_dir_for(params_path))
    else:
        try:
            raw = yaml.safe_load(params_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{params_path}: file not found (set ${PARAMS_ENV} or pass a path)") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{params_path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{params_path}: expected a mapping of settings at the top level")
    return _validate(raw, root=params_path.parent, source=str(params_path))


def conf_dir_for(params_path: Path) -> Path:
    """The Hydra config folder next to ``params_path``, else the project's."""
    local = params_path.parent / CONF_DIR
    return local if (local / f"{CONF_NAME}.yaml").is_file() else PROJECT_ROOT / CONF_DIR


def compose(overrides: Mapping[str, Any] | Sequence[str] = (), conf_dir: Path | None = None) -> dict[str, Any]:
    """The values ``dvc exp run -S ...`` would write to params.yaml: conf/config.yaml, the selected profile
    and the overrides, composed by Hydra (the same calls DVC makes)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    folder = (conf_dir or PROJECT_ROOT / CONF_DIR).resolve()
    arguments = list(overrides) if not isinstance(overrides, Mapping) else hydra_overrides(overrides)
    try:
        with initialize_config_dir(config_dir=str(folder), version_base=None):
            config = hydra_compose(config_name=CONF_NAME, overrides=arguments)
        OmegaConf.resolve(config)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(f"{folder}: cannot compose the settings with {arguments}: {exc}") from None
    values = OmegaConf.to_container(config)
    assert isinstance(values, dict)
    return {str(key): value for key, value in values.items()}


def hydra_overrides(values: Mapping[str, Any]) -> list[str]:
    """``{"profile": "quick", "train.epochs": 2}`` -> ``["profile=quick", "train.epochs=2"]``.

    Config groups (``profile``) are selected by name; other keys are set, or added (``++``) where
    the key is new, e.g. a search-space dimension. Unknown keys are caught by validation afterwards."""
    arguments = []
    for key, value in values.items():
        if key in CONFIG_GROUPS:
            arguments.append(f"{key}={value}")
        else:
            arguments.append(f"++{key}={_hydra_value(value)}")
    return arguments


def _hydra_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{key}:{_hydra_value(item)}" for key, item in value.items()) + "}"
    escaped = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def explicit_keys(settings: Settings, candidates: Iterable[str]) -> set[str]:
    """Which dotted ``candidates`` were set on the command line for this run: their value in params.yaml
    differs from what ``conf/`` gives for the run's profile. Tuned values never replace those."""
    composed = compose({"profile": settings.profile}, conf_dir_for(settings.root / DEFAULT_PARAMS.name))
    baseline = _validate(composed, settings.root, "conf").resolved()
    current = settings.resolved()
    return {dotted for dotted in candidates if _lookup(current, dotted) != _lookup(baseline, dotted)}


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def apply_dotted(raw: dict[str, Any], overrides: Mapping[str, Any], source: str) -> None:
    """Set ``{"train.lr": 0.1}``-style keys in a nested params tree in place (missing sections are made)."""
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
            lines.append(f"  {key}: unknown key{suggest(name, _known_fields(parent_loc))}")
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


def write_params(path: Path, overrides: Mapping[str, Any] | Sequence[str] = ()) -> Path:
    """Write the composed values to ``path`` the way ``dvc exp run`` does (OmegaConf's YAML)."""
    from omegaconf import OmegaConf

    from pipeline.files import write_text

    values = compose(overrides, conf_dir_for(Path(path).resolve()))
    return write_text(Path(path), OmegaConf.to_yaml(OmegaConf.create(values)))


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.config",
        description="Compose conf/ (+ Hydra overrides such as profile=cpu train.epochs=3) into params.yaml, "
                    "as `dvc exp run -S` does; --check only tells whether params.yaml is the composed default.")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. profile=cpu train.epochs=3")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    if args.check:
        current = yaml.safe_load(args.params.read_text(encoding="utf-8"))
        if current != compose(args.overrides, conf_dir_for(args.params.resolve())):
            print(f"{args.params} differs from conf/ composed with {args.overrides or 'the defaults'}: "
                  "run `python -m pipeline.config` after editing conf/ (or this is an experiment's workspace)")
            return 1
        return 0
    write_params(args.params, args.overrides)
    load_settings(args.params)  # validate what was written
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
