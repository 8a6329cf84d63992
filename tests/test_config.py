"""params.yaml is the single source of settings: it loads, overlays profiles and rejects bad keys early."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

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


def test_every_profile_validates():
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text(encoding="utf-8"))
    for name in params["profiles"]:
        assert load_settings(PROJECT_ROOT / "params.yaml", {"profile": name}).profile == name


def test_profile_overlays_only_named_keys(tmp_path):
    settings = load_settings(_write(tmp_path, lambda p: p.update(profile="quick")))
    assert settings.train.epochs == 5  # from the quick overlay
    assert settings.train.optimizer == "sgd"  # untouched base value
    assert settings.root == tmp_path
    assert settings.path("models") == tmp_path / "models"


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = _write(tmp_path, lambda p: p["train"].update(lrate=0.1))
    with pytest.raises(ConfigError, match=r"train\.lrate: unknown key \(did you mean 'lr'\?\)"):
        load_settings(path)


def test_invalid_value_is_named(tmp_path):
    path = _write(tmp_path, lambda p: p["data"].update(val_fraction=1.5))
    with pytest.raises(ConfigError, match=r"data\.val_fraction"):
        load_settings(path)


def test_local_dataset_requires_a_folder(tmp_path):
    path = _write(tmp_path, lambda p: p["data"].update(dataset="local", local_dir=None))
    with pytest.raises(ConfigError, match="local_dir is not set"):
        load_settings(path)


def test_unknown_profile_lists_the_known_ones(tmp_path):
    path = _write(tmp_path, lambda p: p.update(profile="huge"))
    with pytest.raises(ConfigError, match="profile 'huge' is not defined.*full, quick"):
        load_settings(path)


def test_profile_may_not_overlay_data(tmp_path):
    path = _write(tmp_path, lambda p: p["profiles"]["quick"].update(data={"val_fraction": 0.2}))
    with pytest.raises(ConfigError, match=r"profiles\.full\.data|profiles\.\w+\.data"):
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


def test_a_typo_in_an_unselected_profile_fails_at_start(tmp_path):
    path = _write(tmp_path, lambda p: p["profiles"]["quick"]["train"].update(epochz=3))
    with pytest.raises(ConfigError, match=r"profile 'quick'.*\n.*train\.epochz: unknown key"):
        load_settings(path)  # the selected profile is 'full'


def test_explicit_overrides_win_over_the_profile(tmp_path):
    settings = load_settings(_write(tmp_path, lambda p: p.update(profile="quick")), {"train.epochs": 2})
    assert settings.train.epochs == 2
