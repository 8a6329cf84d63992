"""The `local` source: each kind of malformed folder has its own clear error; a valid one works end to end."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pipeline.contract import (
    NPZ_KEY,
    ClassMap,
    DataError,
    load_classmap,
    write_classmap,
)
from pipeline.data import (
    MANIFEST_NAME,
    OFFICIAL_CLASSMAPS,
    OFFICIAL_FILES,
    load_prepared,
    load_test,
    md5_of,
    read_manifest,
    write_npz,
)
from pipeline.stages import download, prepare
from tests.official_files import write_official_folder

Paths = dict[str, Path]


def _arr(path: Path) -> np.ndarray:
    with np.load(path, allow_pickle=False) as archive:
        return archive[NPZ_KEY]


def _rewrite(path: Path, transform: Callable[[np.ndarray], np.ndarray]) -> None:
    write_npz(path, {NPZ_KEY: transform(_arr(path))})


def _edit_classmap(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def _pickled(path: Path) -> None:
    np.savez(path, **{NPZ_KEY: np.array([{"label": 1}], dtype=object)}, allow_pickle=True)


def _half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# (id, break the folder, text the error must contain)
MALFORMED: list[tuple[str, Callable[[Paths], None], str]] = [
    ("missing-file", lambda p: p["test_labels"].unlink(), "missing kmnist-test-labels.npz"),
    ("not-npz", lambda p: p["train_images"].write_text("images,here\n"), "not an .npz archive"),
    (
        "single-npy",
        lambda p: (
            np.save(p["train_labels"].with_suffix(".npy"), _arr(p["train_labels"]))
            or p["train_labels"].with_suffix(".npy").rename(p["train_labels"])
        ),
        "a single .npy array",
    ),
    ("needs-pickle", lambda p: _pickled(p["train_labels"]), "needs pickle"),
    (
        "missing-arr_0",
        lambda p: np.savez(p["test_images"], images=_arr(p["test_images"])),
        "no array named 'arr_0' (found ['images'])",
    ),
    ("damaged-zip", lambda p: _half(p["train_images"]), "damaged .npz archive"),
    (
        "float-images",
        lambda p: _rewrite(p["train_images"], lambda a: a.astype(np.float32)),
        "images have dtype float32, expected uint8",
    ),
    (
        "float-labels",
        lambda p: _rewrite(p["test_labels"], lambda a: a.astype(np.float64)),
        "labels have dtype float64, expected an integer dtype",
    ),
    (
        "wrong-shape",
        lambda p: _rewrite(p["train_images"], lambda a: a[:, :, :27]),
        "images have shape (120, 28, 27), expected (N, 28, 28)",
    ),
    (
        "flat-images",
        lambda p: _rewrite(p["test_images"], lambda a: a.reshape(len(a), -1)),
        "images have shape (40, 784)",
    ),
    ("2d-labels", lambda p: _rewrite(p["train_labels"], lambda a: a[:, None]), "labels have shape (120, 1)"),
    ("count-mismatch", lambda p: _rewrite(p["test_labels"], lambda a: a[:-3]), "40 images but 37 labels"),
    (
        "label-out-of-range",
        lambda p: _rewrite(p["train_labels"], lambda a: np.where(a == 9, 10, a)),
        "labels span 0..10 but the class map declares 10 classes",
    ),
    (
        "negative-label",
        lambda p: _rewrite(p["test_labels"], lambda a: a.astype(np.int64) - 1),
        "labels span -1..8",
    ),
    (
        "empty-split",
        lambda p: (_rewrite(p["test_images"], lambda a: a[:0]), _rewrite(p["test_labels"], lambda a: a[:0])),
        "the split is empty",
    ),
    (
        "class-absent-from-train",
        lambda p: (
            _rewrite(p["train_images"], lambda a: a[_arr(p["train_labels"]) != 3]),
            _rewrite(p["train_labels"], lambda a: a[a != 3]),
        ),
        "train split has no image of 1 of them (3 つ)",
    ),
    ("inverted-polarity", lambda p: _rewrite(p["train_images"], lambda a: 255 - a), "white strokes on black"),
    (
        "bad-header",
        lambda p: _edit_classmap(p["classmap"], "index,codepoint,char", "id,code,char"),
        "bad class-map header 'id,code,char'",
    ),
    (
        "bad-indices",
        lambda p: _edit_classmap(p["classmap"], "\n4,", "\n5,"),
        "class index '5' where 4 was expected",
    ),
    (
        "bad-codepoint",
        lambda p: _edit_classmap(p["classmap"], "U+304A", "304A"),
        "codepoint '304A' is not of the form U+3042",
    ),
    (
        "char-mismatch",
        lambda p: _edit_classmap(p["classmap"], "U+304A,お", "U+304A,あ"),
        "char 'あ' does not match codepoint U+304A",
    ),
    (
        "duplicate-char",
        lambda p: _edit_classmap(p["classmap"], "U+304D,き", "U+304A,お"),
        "lists ['お'] more than once",
    ),
    ("extra-field", lambda p: _edit_classmap(p["classmap"], "U+304A,お", "U+304A,お,x"), "expected 3 fields"),
    (
        "not-utf8",
        lambda p: p["classmap"].write_bytes(p["classmap"].read_text().encode("shift_jis")),
        "class map is not UTF-8",
    ),
]


@pytest.fixture
def folder(tmp_path: Path) -> Paths:
    return write_official_folder(tmp_path / "local", prefix="kmnist", train_per_class=12, test_per_class=4)


def _local_settings(make_settings, folder: Paths, prefix: str = "kmnist"):
    return make_settings(
        {
            "data.dataset": "local",
            "data.local_dir": str(folder["classmap"].parent),
            "data.local_prefix": prefix,
        }
    )


@pytest.mark.parametrize(
    ("breaker", "expected"), [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED]
)
def test_each_malformed_folder_has_its_own_clear_error(make_settings, folder, breaker, expected):
    breaker(folder)
    settings = _local_settings(make_settings, folder)
    with pytest.raises(DataError) as caught:
        download.run(settings)
    assert expected in str(caught.value)
    raw = settings.path("raw")
    assert not raw.exists() or not any(raw.iterdir())  # validated before anything is copied


def test_the_messages_are_distinct():
    assert len({case[2] for case in MALFORMED}) == len(MALFORMED)


def test_a_bad_folder_does_not_touch_earlier_raw_files(make_settings, folder):
    settings = _local_settings(make_settings, folder)
    raw = download.run(settings)
    before = {path.name: path.read_bytes() for path in raw.iterdir()}
    _rewrite(folder["train_images"], lambda a: a.astype(np.float32))
    with pytest.raises(DataError):
        download.run(settings)
    assert {path.name: path.read_bytes() for path in raw.iterdir()} == before


def test_valid_ten_class_folder_works_end_to_end(make_settings, folder):
    settings = _local_settings(make_settings, folder)
    raw = download.run(settings)
    manifest = read_manifest(settings)
    assert manifest["dataset"] == "local" and manifest["prefix"] == "kmnist"
    assert manifest["source"] == str(folder["classmap"].parent.resolve())
    assert (manifest["n_train"], manifest["n_test"], manifest["n_classes"]) == (120, 40, 10)
    for path in folder.values():
        assert (raw / path.name).read_bytes() == path.read_bytes()
        assert manifest["files"][path.name] == {"md5": md5_of(path), "bytes": path.stat().st_size}

    summary = prepare.run(settings)
    assert summary["n_classes"] == 10 and summary["n_train"] + summary["n_val"] == 120
    assert summary["n_test"] == 40
    train, val, test = load_prepared(settings, "train"), load_prepared(settings, "val"), load_test(settings)
    assert len(train) + len(val) == 120 and len(test) == 40
    assert set(np.unique(val.labels)) == set(range(10))
    assert load_classmap(settings.path("prepared") / "classmap.csv").chars == tuple("おきすつなはまやれを")
    assert json.loads((raw / MANIFEST_NAME).read_text(encoding="utf-8")) == manifest


def test_any_number_of_classes_and_any_prefix(make_settings, tmp_path):
    classmap = ClassMap.from_chars("日月火")
    folder = write_official_folder(tmp_path / "three", prefix="mine", classmap=classmap, train_per_class=10)
    settings = _local_settings(make_settings, folder, prefix="mine")
    download.run(settings)
    summary = prepare.run(settings)
    assert summary["n_classes"] == 3
    assert load_classmap(settings.path("raw") / "mine_classmap.csv") == classmap


def test_raw_files_changed_after_the_download_stage_are_refused(make_settings, folder):
    settings = _local_settings(make_settings, folder)
    raw = download.run(settings)
    (raw / folder["test_labels"].name).write_bytes(folder["test_labels"].read_bytes()[:-1])
    with pytest.raises(DataError, match="kmnist-test-labels.npz is missing or changed since the download"):
        load_test(settings)  # evaluation's reader checks the test files
    (raw / folder["train_labels"].name).write_bytes(folder["train_labels"].read_bytes()[:-1])
    with pytest.raises(DataError, match="kmnist-train-labels.npz is missing or changed since the download"):
        prepare.run(settings)


def test_prefix_null_detects_the_one_class_map(make_settings, folder):
    """`dvc exp run -S data.dataset=local -S data.local_dir=DIR` on a folder of official KMNIST files."""
    settings = make_settings({"data.dataset": "local", "data.local_dir": str(folder["classmap"].parent)})
    assert settings.data.local_prefix is None  # the params.yaml default
    raw = download.run(settings)
    manifest = read_manifest(settings)
    assert manifest["prefix"] == "kmnist" and manifest["n_classes"] == 10
    assert sorted(manifest["files"]) == sorted(path.name for path in folder.values())
    for path in folder.values():
        assert (raw / path.name).read_bytes() == path.read_bytes()
    assert prepare.run(settings)["n_classes"] == 10


def test_prefix_null_needs_exactly_one_class_map(make_settings, folder):
    settings = make_settings({"data.dataset": "local", "data.local_dir": str(folder["classmap"].parent)})
    write_official_folder(folder["classmap"].parent, prefix="k49", classmap=ClassMap.from_chars("日月火"))
    several = r"several class maps \(k49_classmap.csv, kmnist_classmap.csv\)"
    with pytest.raises(DataError, match=several) as caught:
        download.run(settings)
    assert "set data.local_prefix" in str(caught.value)
    download.run(settings.with_overrides({"data.local_prefix": "k49"}))  # an explicit prefix picks one
    assert read_manifest(settings)["n_classes"] == 3

    for path in folder["classmap"].parent.glob("*_classmap.csv"):
        path.unlink()
    with pytest.raises(DataError, match=r"no \*_classmap.csv class map.*set data.local_prefix"):
        download.run(settings)


def test_a_missing_folder_is_named(make_settings, tmp_path):
    settings = make_settings({"data.dataset": "local", "data.local_dir": str(tmp_path / "nowhere")})
    with pytest.raises(DataError, match="nowhere: no such folder"):
        download.run(settings)


def test_official_downloads_in_raw_are_never_overwritten(make_settings, tmp_path):
    """The official KMNIST class map (byte-exact, MD5-verified) must survive a local folder that differs."""
    settings = make_settings(
        {"data.dataset": "local", "data.local_dir": str(tmp_path / "other"), "data.local_prefix": "kmnist"}
    )
    official_map = settings.path("raw") / "kmnist_classmap.csv"
    write_classmap(OFFICIAL_CLASSMAPS["kmnist"], official_map)
    assert md5_of(official_map) == OFFICIAL_FILES["kmnist"]["kmnist_classmap.csv"].md5
    write_official_folder(tmp_path / "other", prefix="kmnist", classmap=ClassMap.from_chars("0123456789"))
    with pytest.raises(DataError, match=r"holds official downloaded files \(kmnist_classmap.csv\)"):
        download.run(settings)
    assert md5_of(official_map) == OFFICIAL_FILES["kmnist"]["kmnist_classmap.csv"].md5
    assert sorted(path.name for path in official_map.parent.iterdir()) == ["kmnist_classmap.csv"]

    write_official_folder(tmp_path / "same", prefix="kmnist")  # the official class map itself: fine
    download.run(settings.with_overrides({"data.local_dir": str(tmp_path / "same")}))
