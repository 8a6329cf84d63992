"""The prepare stage: stratified, disjoint, deterministic split and the documented outputs."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.contract import (
    GLYPH_SIDE,
    NPZ_KEY,
    ClassMap,
    DataError,
    official_file_names,
    write_classmap,
)
from pipeline.data import (
    OFFICIAL_FILES,
    LabeledImages,
    load_official,
    load_prepared,
    load_test,
    md5_of,
    read_manifest,
    read_stats,
    subset_per_class,
    write_npz,
)
from pipeline.stages import download, prepare
from tests.official_files import class_images

# An imbalanced 5-class set (like K49, where classes range from 392 to 6,000 images).
IMBALANCED_COUNTS = (8, 20, 40, 75, 160)


@pytest.fixture
def synthetic_settings(make_settings):
    settings = make_settings(
        {
            "data.dataset": "synthetic",
            "data.synthetic.train_per_class": 20,
            "data.synthetic.test_per_class": 3,
            "data.val_fraction": 0.1,
        }
    )
    download.run(settings)
    return settings


def _imbalanced_settings(make_settings, tmp_path: Path, **overrides):
    folder = tmp_path / "imbalanced"
    rng = np.random.default_rng(1)
    names = official_file_names("imb")
    for split, scale in (("train", 1), ("test", 4)):
        labels = np.repeat(np.arange(len(IMBALANCED_COUNTS), dtype=np.uint8), IMBALANCED_COUNTS)
        labels = rng.permutation(labels)
        labels = labels[::scale] if split == "test" else labels
        write_npz(folder / names[f"{split}_images"], {NPZ_KEY: class_images(labels, rng)})
        write_npz(folder / names[f"{split}_labels"], {NPZ_KEY: labels})
    write_classmap(ClassMap.from_chars("あいうえお"), folder / names["classmap"])
    settings = make_settings(
        {"data.dataset": "local", "data.local_dir": str(folder), "data.local_prefix": "imb", **overrides}
    )
    download.run(settings)
    return settings


def _rows(images: np.ndarray) -> Counter:
    return Counter(image.tobytes() for image in images)


def test_outputs_are_written_with_the_documented_keys(synthetic_settings):
    settings = synthetic_settings
    summary = prepare.run(settings)
    prepared, reports = settings.path("prepared"), settings.path("reports")

    for split in ("train", "val"):
        with np.load(prepared / f"{split}.npz", allow_pickle=False) as archive:
            assert sorted(archive.files) == ["images", "labels"]
            images, labels = archive["images"], archive["labels"]
        assert images.dtype == np.uint8 and images.shape[1:] == (GLYPH_SIDE, GLYPH_SIDE)
        assert labels.dtype == np.int64 and labels.shape == (len(images),)
    train = load_prepared(settings, "train")
    assert md5_of(prepared / "classmap.csv") == OFFICIAL_FILES["k49"]["k49_classmap.csv"].md5

    stats = read_stats(settings)
    pixels = train.images.astype(np.float64) / 255.0
    assert stats["pixel_mean"] == pytest.approx(pixels.mean(), abs=1e-12)
    assert stats["pixel_std"] == pytest.approx(pixels.std(), abs=1e-12)
    assert stats["counts"]["train"] == np.bincount(train.labels, minlength=49).tolist()
    assert sum(stats["counts"]["val"]) == stats["n_val"] == summary["n_val"]

    assert json.loads((reports / "data" / "summary.json").read_text(encoding="utf-8")) == summary
    assert summary == {
        "n_train": 882,
        "n_val": 98,
        "n_test": 147,
        "n_classes": 49,
        "min_class_count": 18,
        "max_class_count": 18,
        "imbalance_ratio": 1.0,
        "n_feedback": 0,  # no collect export: no feedback in the training split
    }
    with open(reports / "data" / "class_counts.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["index", "char", "train", "val"] and len(rows) == 49
    assert rows[0] == {"index": "0", "char": "あ", "train": "18", "val": "2"}
    with Image.open(reports / "figures" / "data_samples.png") as figure:
        assert figure.format == "PNG" and min(figure.size) > 200


def test_split_is_stratified_on_imbalanced_classes(make_settings, tmp_path):
    settings = _imbalanced_settings(make_settings, tmp_path, **{"data.val_fraction": 0.25})
    summary = prepare.run(settings)
    val = load_prepared(settings, "val")
    for label, total in enumerate(IMBALANCED_COUNTS):
        assert abs(int((val.labels == label).sum()) - 0.25 * total) <= 1, f"class {label}"
    assert summary["min_class_count"] == 6 and summary["max_class_count"] == 120
    assert summary["imbalance_ratio"] == 20.0


def test_train_and_val_are_disjoint_and_cover_the_official_train_set(make_settings, tmp_path):
    settings = _imbalanced_settings(make_settings, tmp_path)
    prepare.run(settings)
    official = load_official(settings.path("raw"), "imb").train
    assert max(_rows(official.images).values()) == 1  # every official image is unique, so rows identify them
    train, val = load_prepared(settings, "train"), load_prepared(settings, "val")
    assert not set(_rows(train.images)) & set(_rows(val.images))
    assert _rows(train.images) + _rows(val.images) == _rows(official.images)
    # Each image keeps its own label.
    label_of = {image.tobytes(): label for image, label in zip(official.images, official.labels, strict=True)}
    for part in (train, val):
        pairs = zip(part.images, part.labels, strict=True)
        assert all(label_of[image.tobytes()] == label for image, label in pairs)


def test_split_is_deterministic_for_the_seed(make_settings, tmp_path):
    settings = _imbalanced_settings(make_settings, tmp_path)
    prepare.run(settings)
    first = {name: (settings.path("prepared") / name).read_bytes() for name in ("train.npz", "val.npz")}
    again = settings.with_overrides({"paths.prepared": "prepared_again", "paths.reports": "reports_again"})
    prepare.run(again)
    assert {name: (again.path("prepared") / name).read_bytes() for name in first} == first
    other = settings.with_overrides(
        {"seed": settings.seed + 1, "paths.prepared": "prepared_other", "paths.reports": "reports_other"}
    )
    prepare.run(other)
    assert set(_rows(load_prepared(other, "val").images)) != set(_rows(load_prepared(settings, "val").images))


def test_clear_errors_before_and_around_the_stage(make_settings, tmp_path):
    settings = make_settings()
    with pytest.raises(DataError, match="run the download stage first"):
        prepare.run(settings)
    with pytest.raises(DataError, match="run the prepare stage first"):
        load_prepared(settings, "train")
    with pytest.raises(ValueError, match="the test set is read by load_test"):
        load_prepared(settings, "test")
    tiny = _imbalanced_settings(make_settings, tmp_path, **{"data.val_fraction": 0.01})
    expected = r"data.val_fraction=0.01 gives 4 validation and 299 training images for 5 classes"
    with pytest.raises(DataError, match=expected):
        prepare.run(tiny)


def test_prepare_never_reads_the_test_set(make_settings, tmp_path):
    """n_test comes from the download manifest; the test files are only for evaluation (load_test)."""
    settings = _imbalanced_settings(make_settings, tmp_path)
    names = official_file_names("imb")
    raw = settings.path("raw")
    for role in ("test_images", "test_labels"):
        (raw / names[role]).write_bytes(b"not an npz: prepare must not open this")
    summary = prepare.run(settings)
    assert summary["n_test"] == read_manifest(settings)["n_test"] == 76  # 303 official test images / 4
    assert summary["n_train"] + summary["n_val"] == sum(IMBALANCED_COUNTS)
    with pytest.raises(DataError, match="imb-test-imgs.npz is missing or changed since the download stage"):
        load_test(settings)  # evaluation's reader does check them


def test_subset_per_class_caps_each_class_deterministically():
    labels = np.repeat(np.arange(3), (2, 10, 30)).astype(np.int64)
    images = np.arange(len(labels), dtype=np.uint8)[:, None, None] * np.ones((1, 28, 28), np.uint8)
    data = LabeledImages(images, labels)
    subset = subset_per_class(data, 5, seed=0)
    assert np.bincount(subset.labels).tolist() == [2, 5, 5]
    assert np.all(np.diff(subset.images[:, 0, 0].astype(int)) > 0)  # original order kept
    assert np.array_equal(subset.labels, labels[subset.images[:, 0, 0]])  # pairs stay together
    assert np.array_equal(subset_per_class(data, 5, seed=0).images, subset.images)
    assert not np.array_equal(subset_per_class(data, 5, seed=1).images, subset.images)
    assert subset_per_class(data, None, seed=0) is data
