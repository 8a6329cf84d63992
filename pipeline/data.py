"""The data layer shared by the stages: official-format facts, loading with ``allow_pickle=False`` and one
validation whatever the source, the manifest and the prepared splits. No torch."""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Settings
from pipeline.contract import (
    CLASSMAP_SUFFIX,
    GLYPH_SIDE,
    NPZ_KEY,
    ClassMap,
    DataError,
    load_classmap,
    official_file_names,
)
from pipeline.files import FILE_MODE, atomic_path

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
PREPARED_SPLITS = ("train", "val")
PREPARED_KEYS = ("images", "labels")
CLASSMAP_NAME = "classmap.csv"
STATS_NAME = "stats.json"
# Official images have a black background; a larger mean means the polarity is inverted.
MAX_MEAN_PIXEL = 127.5
HASH_CHUNK_BYTES = 1 << 20
ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)  # fixed, so equal arrays give byte-identical .npz files
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"

_K49_CHARS = (
    "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわゐゑをんゝ"
)
_KMNIST_K49_INDICES = (4, 6, 12, 17, 20, 25, 30, 35, 41, 46)


@dataclass(frozen=True)
class FileFact:
    md5: str
    bytes: int


# MD5 and size of every official file (see /work/shared/DATASETS.md for the sources).
OFFICIAL_FILES: dict[str, dict[str, FileFact]] = {
    "k49": {
        "k49-train-imgs.npz": FileFact("7ac088b20481cf51dcd01ceaab89d821", 66_117_696),
        "k49-train-labels.npz": FileFact("44a8e1b893f81e63ff38d73cad420f7a", 164_485),
        "k49-test-imgs.npz": FileFact("d352e201d846ce6b94f42c990966f374", 10_971_201),
        "k49-test-labels.npz": FileFact("4da6f7a62e67a832d5eb1bd85c5ee448", 27_450),
        "k49_classmap.csv": FileFact("f7d0d0391f68bdf0fe4cf160ceb85753", 697),
    },
    "kmnist": {
        "kmnist-train-imgs.npz": FileFact("a183fbc01ed9a345513b145673d3d0bb", 18_384_171),
        "kmnist-train-labels.npz": FileFact("b0e1d240e8afec72b50437fc3bc5908a", 29_700),
        "kmnist-test-imgs.npz": FileFact("dace6de62ca8b90843cc45366337d02e", 3_079_479),
        "kmnist-test-labels.npz": FileFact("3ae489a79983d0fe386152684e3b5412", 5_304),
        "kmnist_classmap.csv": FileFact("899202f6e8dc29a321ac210a03d0f2f1", 151),
    },
}

OFFICIAL_CLASSMAP_MD5 = {
    dataset: facts[f"{dataset}_classmap.csv"].md5 for dataset, facts in OFFICIAL_FILES.items()
}


@dataclass(frozen=True)
class LabeledImages:
    """Images uint8 (N, 28, 28), white ink on black, with labels int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


OFFICIAL_CLASSMAPS: dict[str, ClassMap] = {
    "k49": ClassMap.from_chars(_K49_CHARS),
    "kmnist": ClassMap.from_chars(tuple(_K49_CHARS[index] for index in _KMNIST_K49_INDICES)),
}


@dataclass(frozen=True)
class OfficialData:
    """The validated contents of a folder in the official format."""

    train: LabeledImages
    test: LabeledImages
    classmap: ClassMap


def _split_roles(split: str) -> tuple[str, str]:
    return f"{split}_images", f"{split}_labels"


# ----------------------------------------------------------------------------------------- file helpers


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write arrays to a compressed ``.npz`` atomically; equal arrays give byte-identical files."""
    with atomic_path(path) as temp, zipfile.ZipFile(temp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, array in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_TIMESTAMP)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = FILE_MODE << 16
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
    return Path(path)


# -------------------------------------------------------------------------------------------- validation


def read_npz_array(path: Path, key: str = NPZ_KEY) -> np.ndarray:
    """Load one array of an ``.npz`` without pickle; every kind of bad file gets its own DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as handle:
        magic = handle.read(len(_NPY_MAGIC))
    if magic.startswith(_NPY_MAGIC):
        raise DataError(
            f"{path}: a single .npy array, not an .npz archive; save it with np.savez(path, array)"
        )
    if not magic.startswith(_ZIP_MAGIC):
        raise DataError(f"{path}: not an .npz archive (no zip signature); save it with np.savez(path, array)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if key not in archive.files:
                raise DataError(
                    f"{path}: no array named {key!r} (found {archive.files or 'none'}); the official format "
                    f"keeps the array under {key!r}: np.savez(path, array)"
                )
            return archive[key]
    except DataError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc):
            raise DataError(
                f"{path}: {key!r} is an object array that needs pickle, which is refused for safety; save a "
                "numeric array (uint8 images, integer labels)"
            ) from None
        raise DataError(f"{path}: damaged .npz archive ({exc}); replace the file") from None
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise DataError(
            f"{path}: damaged .npz archive ({type(exc).__name__}: {exc}); replace the file"
        ) from None


def validate_split(images: np.ndarray, labels: np.ndarray, num_classes: int, where: str) -> LabeledImages:
    """Check one split against the data contract; returns it with labels as int64."""
    if images.dtype != np.uint8:
        raise DataError(
            f"{where}: images have dtype {images.dtype}, expected uint8 (0..255, white ink on black)"
        )
    if images.ndim != 3 or images.shape[1:] != (GLYPH_SIDE, GLYPH_SIDE):
        raise DataError(
            f"{where}: images have shape {images.shape}, expected (N, {GLYPH_SIDE}, {GLYPH_SIDE})"
        )
    if labels.ndim != 1:
        raise DataError(f"{where}: labels have shape {labels.shape}, expected (N,)")
    if labels.dtype.kind not in "iu":
        raise DataError(
            f"{where}: labels have dtype {labels.dtype}, expected an integer dtype (class indices)"
        )
    if len(images) != len(labels):
        raise DataError(f"{where}: {len(images)} images but {len(labels)} labels; the counts must be equal")
    if len(labels) == 0:
        raise DataError(f"{where}: the split is empty (0 images)")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise DataError(
            f"{where}: labels span {low}..{high} but the class map declares {num_classes} classes "
            f"(0..{num_classes - 1}); fix the labels or the class map"
        )
    if float(images.mean()) > MAX_MEAN_PIXEL:
        raise DataError(
            f"{where}: mean pixel {images.mean():.0f} looks like dark ink on a white background; the format "
            "is white strokes on black: store 255 - images"
        )
    return LabeledImages(images, labels.astype(np.int64))


def load_official(folder: Path, prefix: str) -> OfficialData:
    """Load and validate a folder in the official format (files named by ``prefix``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(
            f"{folder}: no such folder (data.local_dir must point at the folder holding the files)"
        )
    names = official_file_names(prefix)
    missing = [name for name in names.values() if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"{folder}: missing {', '.join(missing)}; the folder needs {', '.join(names.values())} "
            "(official format: .npz with one array 'arr_0', class map CSV index,codepoint,char)"
        )
    classmap = load_classmap(folder / names["classmap"])
    train = _load_split(folder, prefix, "train", classmap)
    test = _load_split(folder, prefix, "test", classmap)
    check_train_covers_classes(folder, train, classmap)
    return OfficialData(train, test, classmap)


def _load_split(folder: Path, prefix: str, split: str, classmap: ClassMap) -> LabeledImages:
    names = official_file_names(prefix)
    images_role, labels_role = _split_roles(split)
    images = read_npz_array(folder / names[images_role])
    labels = read_npz_array(folder / names[labels_role])
    where = f"{folder / names[images_role]} + {names[labels_role]}"
    return validate_split(images, labels, len(classmap), where)


def check_train_covers_classes(folder: Path, train: LabeledImages, classmap: ClassMap) -> None:
    absent = np.flatnonzero(np.bincount(train.labels, minlength=len(classmap)) == 0)
    if absent.size:
        shown = ", ".join(f"{index} {classmap.chars[index]}" for index in absent[:10])
        raise DataError(
            f"{folder}: the class map declares {len(classmap)} classes but the train split has no image of "
            f"{absent.size} of them ({shown}); drop them from the class map or add training images"
        )


def local_prefix(folder: Path, prefix: str | None) -> str:
    """``prefix``, or when None the prefix of the one ``*_classmap.csv`` in ``folder``."""
    if prefix is not None:
        return prefix
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(
            f"{folder}: no such folder (data.local_dir must point at the folder holding the files)"
        )
    found = sorted(path.name for path in folder.glob(f"*{CLASSMAP_SUFFIX}") if path.is_file())
    if len(found) != 1:
        what = f"several class maps ({', '.join(found)})" if found else f"no *{CLASSMAP_SUFFIX} class map"
        raise DataError(
            f"{folder}: data.local_prefix is null (auto-detect) but the folder holds {what}; "
            f"set data.local_prefix to the prefix of the files, e.g. -S data.local_prefix=kmnist for "
            f"kmnist-train-imgs.npz ... kmnist{CLASSMAP_SUFFIX}"
        )
    return found[0].removesuffix(CLASSMAP_SUFFIX)


def read_manifest(settings: Settings) -> dict[str, Any]:
    """The download stage's ``manifest.json`` (dataset, source, prefix, per-file md5/bytes, counts)."""
    path = settings.path("raw") / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path} not found: run the download stage first (`dvc repro download`)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); run the download stage again") from None


def verified_raw_split(settings: Settings, split: str) -> tuple[LabeledImages, ClassMap, dict[str, Any]]:
    """One raw split and the class map, their files checked against the manifest's MD5s first.

    Only that split's files are opened, so the prepare stage never reads the test set.
    """
    manifest = read_manifest(settings)
    raw, prefix = settings.path("raw"), manifest["prefix"]
    names = official_file_names(prefix)
    for role in ("classmap", *_split_roles(split)):
        path = raw / names[role]
        fact = manifest["files"].get(names[role])
        if fact is None or not path.is_file() or md5_of(path) != fact["md5"]:
            raise DataError(
                f"{path} is missing or changed since the download stage (MD5 differs from {MANIFEST_NAME}); "
                "run the download stage again"
            )
    classmap = load_classmap(raw / names["classmap"])
    return _load_split(raw, prefix, split, classmap), classmap, manifest


def load_test(settings: Settings) -> LabeledImages:
    """The official test split (MD5-checked against the manifest, validated); only evaluation reads it."""
    test, _, _ = verified_raw_split(settings, "test")
    return test


# ------------------------------------------------------------------------------ prepared splits


def load_prepared(settings: Settings, split: str) -> LabeledImages:
    """The prepared ``"train"`` or ``"val"`` split (validated)."""
    if split not in PREPARED_SPLITS:
        raise ValueError(
            f"split must be one of {PREPARED_SPLITS} (the test set is read by load_test), got {split!r}"
        )
    prepared = settings.path("prepared")
    path = prepared / f"{split}.npz"
    if not path.is_file():
        raise DataError(f"{path} not found: run the prepare stage first (`dvc repro prepare`)")
    classmap = load_classmap(prepared / CLASSMAP_NAME)
    images, labels = (read_npz_array(path, key) for key in PREPARED_KEYS)
    return validate_split(images, labels, len(classmap), str(path))


def read_stats(settings: Settings) -> dict[str, Any]:
    """The prepare stage's ``stats.json`` (pixel_mean, pixel_std in 0..1, per-class counts)."""
    path = settings.path("prepared") / STATS_NAME
    if not path.is_file():
        raise DataError(f"{path} not found: run the prepare stage first (`dvc repro prepare`)")
    return json.loads(path.read_text(encoding="utf-8"))


def subset_per_class(data: LabeledImages, max_per_class: int | None, seed: int) -> LabeledImages:
    """At most ``max_per_class`` random images of each class (original order kept); None keeps all."""
    if max_per_class is None:
        return data
    if max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1 or None, got {max_per_class}")
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(data.labels):
        members = np.flatnonzero(data.labels == label)
        if len(members) > max_per_class:
            members = rng.choice(members, size=max_per_class, replace=False)
        keep.append(members)
    chosen = np.sort(np.concatenate(keep))
    return LabeledImages(data.images[chosen], data.labels[chosen])
