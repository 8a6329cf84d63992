"""The one loader of training inputs: prepared splits cut to per-class caps, class map and pixel stats."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import data
from pipeline.config import Settings
from pipeline.contract import ClassMap, load_classmap


@dataclass(frozen=True)
class TrainingInputs:
    """What ``loop.fit`` trains and selects on, and the facts the model is built with."""

    train: data.LabeledImages
    val: data.LabeledImages
    classmap: ClassMap
    pixel_mean: float
    pixel_std: float

    @property
    def num_classes(self) -> int:
        return len(self.classmap)


def load_training_inputs(settings: Settings, max_train_per_class: int | None,
                         max_val_per_class: int | None) -> TrainingInputs:
    """Prepared train/val, each cut to at most ``max_*_per_class`` images per class (None keeps all)."""
    train = data.subset_per_class(data.load_prepared(settings, "train"), max_train_per_class, settings.seed)
    val = data.subset_per_class(data.load_prepared(settings, "val"), max_val_per_class, settings.seed)
    stats = data.read_stats(settings)
    classmap = load_classmap(settings.path("prepared") / data.CLASSMAP_NAME)
    return TrainingInputs(train, val, classmap, float(stats["pixel_mean"]), float(stats["pixel_std"]))
