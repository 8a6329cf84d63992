"""conf/ holds each knob's one default; params.yaml is their composition for a run (defaults < profile <
command line, as `dvc exp run -S` composes it); bad keys and values are named before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline import config
from pipeline.config import PARAMS_ENV, ConfigError, load_settings
from tests.support import PROJECT_ROOT


def _write(tmp_path: Path, mutate) -> Path:
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text(encoding="utf-8"))
    mutate(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


def test_project_params_load_with_full_profile_by_default():
    settings = load_settings(PROJECT_ROOT / "params.yaml")
    assert settings.profile == "full"
    assert settings.data.dataset == "k49"
    assert settings.path("raw") == PROJECT_ROOT / "data" / "raw"


PROFILES = sorted(path.stem for path in (PROJECT_ROOT / "conf" / "profile").glob("*.yaml"))


def test_params_yaml_is_conf_composed_with_the_defaults():
    """The committed params.yaml is what `dvc exp run` would write with no -S: one default per knob."""
    assert config.main(["--check"]) == 0


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_composes_validates_and_names_itself(profile):
    assert load_settings(PROJECT_ROOT / "params.yaml", {"profile": profile}).profile == profile


def test_defaults_then_profile_then_command_line(tmp_path):
    full = load_settings(PROJECT_ROOT / "params.yaml")
    quick = load_settings(PROJECT_ROOT / "params.yaml", {"profile": "quick"})
    assert (full.train.epochs, quick.train.epochs) == (60, 5)  # the profile wins over the default
    assert quick.train.optimizer == full.train.optimizer == "sgd"  # keys a profile leaves alone
    pinned = load_settings(PROJECT_ROOT / "params.yaml", {"profile": "quick", "train.epochs": 2})
    assert pinned.train.epochs == 2  # the command line wins over the profile ...
    assert pinned.train.lr == quick.train.lr  # ... and changes nothing else
    also = load_settings(PROJECT_ROOT / "params.yaml", {"train.epochs": 2, "profile": "quick"})
    assert also.train.epochs == 2  # whatever the order


def test_composed_params_file_is_what_loads(tmp_path):
    path = config.write_params(tmp_path / "params.yaml", {"profile": "quick", "data.dataset": "synthetic"})
    settings = load_settings(path)
    assert (settings.profile, settings.data.dataset, settings.train.epochs) == ("quick", "synthetic", 5)
    assert settings.root == tmp_path
    assert settings.path("models") == tmp_path / "models"


def test_command_line_values_are_known_as_explicit(tmp_path):
    path = config.write_params(tmp_path / "params.yaml", ["profile=quick", "train.lr=0.07"])
    settings = load_settings(path)
    assert config.explicit_keys(settings, ["train.lr", "train.epochs", "model.dropout"]) == {"train.lr"}


def test_unknown_profile_is_refused():
    with pytest.raises(ConfigError, match="huge"):
        load_settings(PROJECT_ROOT / "params.yaml", {"profile": "huge"})


def test_a_typo_on_the_command_line_is_named():
    with pytest.raises(ConfigError, match=r"train\.epochz: unknown key \(did you mean 'epochs'\?\)"):
        load_settings(PROJECT_ROOT / "params.yaml", {"profile": "quick", "train.epochz": 3})


def test_dvc_stages_depend_on_the_recipe_sections_they_read():
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for stage in ("tune", "train"):
        params = set(stages[stage]["params"])
        assert set(config.RECIPE_SECTIONS) <= params, stage
    assert "tune" in stages["tune"]["params"]


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = _write(tmp_path, lambda p: p["train"].update(lrate=0.1))
    with pytest.raises(ConfigError, match=r"train\.lrate: unknown key \(did you mean 'lr'\?\)"):
        load_settings(path)


@pytest.mark.parametrize(("old", "new"), [("max_batch_size", "engine_max_batch"),
                                          ("max_batch_images", "max_images_per_request")])
def test_renamed_serve_limits_name_their_new_key(tmp_path, old, new):
    path = _write(tmp_path, lambda p: p["serve"].update({old: 8}))
    with pytest.raises(ConfigError, match=rf"serve\.{old} was renamed serve\.{new}"):
        load_settings(path)


def test_invalid_value_is_named(tmp_path):
    path = _write(tmp_path, lambda p: p["data"].update(val_fraction=1.5))
    with pytest.raises(ConfigError, match=r"data\.val_fraction"):
        load_settings(path)


def test_local_dataset_requires_a_folder(tmp_path):
    path = _write(tmp_path, lambda p: p["data"].update(dataset="local", local_dir=None))
    with pytest.raises(ConfigError, match="local_dir is not set"):
        load_settings(path)


def test_search_space_keys_must_name_real_settings(tmp_path):
    path = _write(tmp_path, lambda p: p["tune"]["search_space"].update({"train.lr_max": {"type": "float", "low": 0.1, "high": 1}}))
    with pytest.raises(ConfigError, match="train has no setting 'lr_max'"):
        load_settings(path)


def test_search_dimension_needs_a_valid_range(tmp_path):
    path = _write(tmp_path, lambda p: p["tune"]["search_space"].update({"train.lr": {"type": "float", "low": 1, "high": 0.1}}))
    with pytest.raises(ConfigError, match="'low' < 'high'"):
        load_settings(path)


def test_overrides_are_validated(tmp_path):
    settings = load_settings(_write(tmp_path, lambda p: None))
    assert settings.with_overrides({"train.lr": 0.3}).train.lr == 0.3
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        settings.with_overrides({"train.batch_size": 0})


def test_env_var_points_at_another_params_file(tmp_path, monkeypatch):
    path = _write(tmp_path, lambda p: p.update(seed=7))
    monkeypatch.setenv(PARAMS_ENV, str(path))
    assert load_settings().seed == 7


def test_missing_or_malformed_file_is_explained(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)


def test_moved_test_time_augmentation_names_its_new_key(tmp_path):
    path = _write(tmp_path, lambda p: p["evaluate"].update(tta=True))
    with pytest.raises(ConfigError, match=r"evaluate\.tta moved.*model\.tta_rotations_deg"):
        load_settings(path)


@pytest.mark.parametrize(("views", "error"), [([0.0, 0.0], "lists an angle twice"), ([45.0], "30"),
                                               ([float(a) for a in range(9)], "at most 8")])
def test_bad_test_time_views_are_explained(tmp_path, views, error):
    path = _write(tmp_path, lambda p: p["model"].update(tta_rotations_deg=views))
    with pytest.raises(ConfigError, match=rf"model\.tta_rotations_deg.*{error}|{error}"):
        load_settings(path)
