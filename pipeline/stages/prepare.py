"""The prepare stage: a stratified train/validation split of the official train set, pixel statistics and
data reports. The test set is only read by evaluation (``data.load_test``); prepare takes its size from the
manifest.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import data
from pipeline.config import Settings
from pipeline.contract import (
    FEEDBACK_MANIFEST,
    FEEDBACK_PREFIX,
    GLYPH_SIDE,
    ClassMap,
    DataError,
    load_classmap,
    write_classmap,
)
from pipeline.data import CLASSMAP_NAME, STATS_NAME, LabeledImages, read_npz_array, write_npz
from pipeline.files import write_json, write_text

logger = logging.getLogger(__name__)

# Prepare-stage reports, relative to paths.reports (dvc.yaml names the same files).
SUMMARY_REPORT = "data/summary.json"
CLASS_COUNTS_REPORT = "data/class_counts.csv"
SAMPLES_FIGURE = "figures/data_samples.png"
IMAGE_SHAPE = (GLYPH_SIDE, GLYPH_SIDE)
MIN_PER_CLASS_FOR_SPLIT = 2  # a stratified split puts one image of each class on each side
SAMPLE_GRID_MAX_CLASSES = 64  # the data_samples figure shows one image for each of the first N classes


def run(settings: Settings) -> dict[str, Any]:
    """The prepare stage: stratified train/val split, pixel statistics, data reports. Returns the summary."""
    from sklearn.model_selection import train_test_split

    train, classmap, manifest = data.verified_raw_split(settings, "train")
    data.check_train_covers_classes(settings.path("raw"), train, classmap)
    n_classes = len(classmap)
    counts = np.bincount(train.labels, minlength=n_classes)
    small = np.flatnonzero(counts < MIN_PER_CLASS_FOR_SPLIT)
    if small.size:
        raise DataError(
            f"classes {[classmap.chars[i] for i in small[:10]]} have fewer than {MIN_PER_CLASS_FOR_SPLIT} "
            "training images; a stratified train/validation split needs at least one on each side"
        )
    n_val = int(np.ceil(settings.data.val_fraction * len(train)))
    if n_val < n_classes or len(train) - n_val < n_classes:
        raise DataError(
            f"data.val_fraction={settings.data.val_fraction} gives {n_val} validation and "
            f"{len(train) - n_val} training images for {n_classes} classes; each side needs at least one "
            "image per class: choose a val_fraction between "
            f"{n_classes / len(train):.3g} and {1 - n_classes / len(train):.3g}"
        )
    indices = np.arange(len(train))
    train_idx, val_idx = train_test_split(
        indices, test_size=settings.data.val_fraction, stratify=train.labels, random_state=settings.seed
    )
    splits = {
        "train": LabeledImages(train.images[np.sort(train_idx)], train.labels[np.sort(train_idx)]),
        "val": LabeledImages(train.images[np.sort(val_idx)], train.labels[np.sort(val_idx)]),
    }
    # Feedback joins the training split only: validation (which chooses the model) and test never move.
    feedback, used = load_feedback(settings.path("feedback"), classmap)
    if len(feedback):
        splits["train"] = LabeledImages(np.concatenate([splits["train"].images, feedback.images]),
                                        np.concatenate([splits["train"].labels, feedback.labels]))

    prepared = settings.path("prepared")
    for split, part in splits.items():
        write_npz(prepared / f"{split}.npz", {"images": part.images, "labels": part.labels})
    write_classmap(classmap, prepared / CLASSMAP_NAME)
    split_counts = {split: np.bincount(part.labels, minlength=n_classes) for split, part in splits.items()}
    pixel_mean, pixel_std = _pixel_stats(splits["train"].images)
    write_json(
        prepared / STATS_NAME,
        {
            "pixel_mean": pixel_mean,
            "pixel_std": pixel_std,
            "n_train": len(splits["train"]),
            "n_val": len(splits["val"]),
            "n_classes": n_classes,
            "counts": {split: counts.tolist() for split, counts in split_counts.items()},
            **({"feedback": used} if used["items"] else {}),  # no feedback: the file as before it existed
        },
    )

    train_counts = split_counts["train"]
    summary = {
        "n_train": len(splits["train"]),
        "n_val": len(splits["val"]),
        "n_test": int(manifest["n_test"]),  # counted by the download stage; prepare never reads test files
        "n_classes": n_classes,
        "min_class_count": int(train_counts.min()),
        "max_class_count": int(train_counts.max()),
        "imbalance_ratio": round(float(train_counts.max() / train_counts.min()), 4),
        "n_feedback": used["items"],
    }
    reports = settings.path("reports")
    write_json(reports / SUMMARY_REPORT, summary)
    rows = ["index,char,train,val"] + [
        f"{index},{char},{train_counts[index]},{split_counts['val'][index]}"
        for index, char in enumerate(classmap.chars)
    ]
    write_text(reports / CLASS_COUNTS_REPORT, "\n".join(rows) + "\n")
    _save_samples(splits["train"], classmap, reports / SAMPLES_FIGURE, settings.seed)
    logger.info("prepared %s: %s", prepared, summary)
    return summary


def load_feedback(folder: Path, classmap: ClassMap) -> tuple[LabeledImages, dict[str, int]]:
    """The collect stage's export, its labels mapped onto the dataset's class map by character; empty when
    there is none. Returns the images and what the training run records (items, highest store id)."""
    manifest_path = folder / FEEDBACK_MANIFEST
    none = LabeledImages(np.zeros((0, *IMAGE_SHAPE), dtype=np.uint8), np.zeros(0, dtype=np.int64))
    if not manifest_path.is_file():
        return none, {"items": 0, "max_id": 0}
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if not manifest.get("n_items"):
        return none, {"items": 0, "max_id": 0}
    images = read_npz_array(folder / f"{FEEDBACK_PREFIX}-train-imgs.npz")
    labels = read_npz_array(folder / f"{FEEDBACK_PREFIX}-train-labels.npz").astype(np.int64)
    chars = load_classmap(folder / f"{FEEDBACK_PREFIX}_classmap.csv").chars
    unknown = sorted(set(chars) - set(classmap.chars))
    if unknown:
        raise DataError(f"{folder}: feedback labelled {unknown} is not in this dataset's class map: collect it "
                        "with the model of this dataset, or reject those items (python -m pipeline.stages.collect "
                        "review --reject IDS)")
    if images.shape != (len(labels), *IMAGE_SHAPE) or images.dtype != np.uint8:
        raise DataError(f"{folder}: feedback images are {images.shape} {images.dtype}, labels {labels.shape}")
    mapping = np.array([classmap.chars.index(char) for char in chars], dtype=np.int64)
    return (LabeledImages(images, mapping[labels] if len(labels) else labels),
            {"items": len(labels), "max_id": int(manifest.get("max_id", 0))})


def _pixel_stats(images: np.ndarray) -> tuple[float, float]:
    """Exact pixel mean and std in 0..1 units, from a 256-bin histogram (no float copy of the data)."""
    histogram = np.bincount(images.ravel(), minlength=256).astype(np.float64)
    values = np.arange(256, dtype=np.float64) / 255.0
    total = histogram.sum()
    mean = float((histogram * values).sum() / total)
    std = float(np.sqrt((histogram * (values - mean) ** 2).sum() / total))
    return mean, std


def _save_samples(data: LabeledImages, classmap: ClassMap, path: Path, seed: int) -> None:
    from pipeline.figures import save_image_grid

    rng = np.random.default_rng(seed)
    shown = range(min(len(classmap), SAMPLE_GRID_MAX_CLASSES))
    picks = [int(rng.choice(np.flatnonzero(data.labels == index))) for index in shown]
    save_image_grid(
        data.images[picks],
        [f"{index} {classmap.chars[index]}" for index in shown],
        path,
        columns=int(np.ceil(np.sqrt(len(picks)))),
        suptitle="one training image per class",
    )

