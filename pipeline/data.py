"""The data layer: get the official files (download, local folder or synthetic), validate, split.

Stages:

- ``fetch_raw(settings)`` (download): the official K49/KMNIST files with their MD5s checked, a local folder
  in the official format (validated), or the synthetic stand-in, all into ``paths.raw`` with a
  ``manifest.json``. Every file lands atomically: a temporary file in the same folder, fsync, rename.
  Official files are downloaded into ``paths.downloads/<dataset>`` first: DVC deletes ``paths.raw`` before
  re-running the stage, and that cache (MD5-checked, not a DVC output) spares a new download each time.
- ``prepare(settings)`` (prepare): a stratified train/validation split of the official train set, pixel
  statistics and data reports. The test set is only read by ``load_test`` (evaluation); prepare takes
  its size from the manifest.

Files are always loaded with ``allow_pickle=False`` and validated (dtype, shape, label range, class map)
by the same code, whatever their source. This module imports no torch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import DownloadSettings, Settings
from pipeline.contract import (
    CLASSMAP_HEADER,
    CLASSMAP_SUFFIX,
    GLYPH_SIDE,
    MIN_CLASSES,
    NPZ_KEY,
    ClassMap,
    DataError,
    load_classmap,
    official_file_names,
    write_classmap,
)
from pipeline.files import FILE_MODE, TEMP_SUFFIX, atomic_path, remove_stale_parts, write_json, write_text

logger = logging.getLogger(__name__)

OFFICIAL_BASE_URL = "http://codh.rois.ac.jp/kmnist/dataset/{dataset}/"
MANIFEST_NAME = "manifest.json"
PREPARED_SPLITS = ("train", "val")
PREPARED_KEYS = ("images", "labels")
CLASSMAP_NAME = "classmap.csv"
STATS_NAME = "stats.json"
# Prepare-stage reports, relative to paths.reports (dvc.yaml names the same files).
SUMMARY_REPORT = "data/summary.json"
CLASS_COUNTS_REPORT = "data/class_counts.csv"
SAMPLES_FIGURE = "figures/data_samples.png"
MIN_PER_CLASS_FOR_SPLIT = 2  # a stratified split puts one image of each class on each side
# Official images have a black background; a larger mean means the polarity is inverted.
MAX_MEAN_PIXEL = 127.5
SAMPLE_GRID_MAX_CLASSES = 64  # the data_samples figure shows one image for each of the first N classes
HASH_CHUNK_BYTES = 1 << 20
ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)  # fixed, so equal arrays give byte-identical .npz files
# Retrying these HTTP statuses may help (server busy or failing); other errors will not change.
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
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

NO_DOWNLOAD_HINT = (
    "What to do: check the network, point data.base_url at a mirror holding the official files, or set "
    "data.dataset=local with data.local_dir holding the files you already have"
)


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


def _copy_file(source: Path, target: Path) -> Path:
    with atomic_path(target) as temp:
        shutil.copyfile(source, temp)
    return target


def _link_or_copy(source: Path, target: Path) -> Path:
    """Hard-link ``source`` to ``target`` (atomic rename over it); copy where links are impossible.

    Only for files that are replaced, never written in place (the download cache): a shared inode is safe.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(target.parent, target.name)
    temp = target.parent / f".{target.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    try:
        os.link(source, temp)  # another filesystem, or one without hard links: OSError
    except OSError as exc:
        logger.info("%s: cannot hard-link into %s (%s); copying", source, target.parent, exc)
        return _copy_file(source, target)
    try:
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return target


# ---------------------------------------------------------------------------------------------- download


class _Retryable(Exception):
    """A failed attempt that may succeed when tried again (network error, busy server, cut-off body)."""


def download_files(
    base_url: str,
    dest_dir: Path,
    expected: Mapping[str, str],
    options: DownloadSettings,
    sizes: Mapping[str, int] | None = None,
) -> list[Path]:
    """Download ``base_url/<name>`` for each name of ``expected`` (name -> MD5) into ``dest_dir``.

    A file already there with the right MD5 is kept. Each file is streamed to a temporary file, its
    size (Content-Length and ``sizes``, when known) and MD5 checked, then renamed into place; network
    errors, retryable HTTP statuses and truncated bodies are retried ``options.retries`` times with
    exponential backoff. Raises :class:`DataError` naming the file and URL.
    """
    import httpx

    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    sizes = sizes or {}
    paths = []
    with httpx.Client(
        timeout=httpx.Timeout(options.timeout_s),
        follow_redirects=True,
        headers={"Accept-Encoding": "identity"},  # byte counts then match Content-Length
    ) as client:
        for name, md5 in expected.items():
            target = dest_dir / name
            remove_stale_parts(dest_dir, name)  # left by a killed run; never accepted, never reused
            if target.is_file():
                if md5_of(target) == md5.lower():
                    logger.info("%s: already present with the expected MD5, not downloaded again", target)
                    paths.append(target)
                    continue
                logger.warning("%s: present but its MD5 differs; downloading it again", target)
            url = f"{base_url.rstrip('/')}/{name}"
            paths.append(_download_one(client, url, target, md5.lower(), sizes.get(name), options))
    return paths


def _download_one(
    client: Any, url: str, target: Path, md5: str, size: int | None, options: DownloadSettings
) -> Path:
    attempts = options.retries + 1
    for attempt in range(attempts):
        try:
            with atomic_path(target) as temp:
                received, digest = _stream(client, url, temp, size)
                if digest != md5:
                    raise DataError(
                        f"{target.name} downloaded from {url} has MD5 {digest} ({received} bytes), expected "
                        f"{md5}: the server holds a different or damaged file; nothing was kept. "
                        + NO_DOWNLOAD_HINT
                    )
            logger.info("%s: downloaded from %s (%d bytes, MD5 ok)", target, url, received)
            return target
        except _Retryable as exc:
            if attempt + 1 >= attempts:
                raise DataError(
                    f"could not download {target.name} from {url} after {attempts} attempt(s): {exc}. "
                    + NO_DOWNLOAD_HINT
                ) from None
            delay = options.backoff_s * 2**attempt
            logger.warning("%s: %s; retry %d/%d in %.1fs", url, exc, attempt + 1, options.retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises


def _stream(client: Any, url: str, temp: Path, size: int | None) -> tuple[int, str]:
    """GET ``url`` into ``temp``; return (bytes received, MD5). Raises _Retryable or DataError."""
    import httpx
    from tqdm import tqdm

    digest = hashlib.md5(usedforsecurity=False)
    received = 0
    try:
        with client.stream("GET", url) as response:
            status = response.status_code
            if status in RETRYABLE_STATUS:
                raise _Retryable(f"HTTP {status}")
            if status != httpx.codes.OK:
                raise DataError(
                    f"could not download {Path(url).name} from {url}: "
                    f"HTTP {status} {response.reason_phrase}. " + NO_DOWNLOAD_HINT
                )
            declared = _content_length(response)
            if declared is not None and size is not None and declared != size:
                raise DataError(  # checked before the body: no need to fetch a file we would reject
                    f"{Path(url).name} at {url} has {declared} bytes (Content-Length), expected {size}: the "
                    "server holds a different file; nothing was kept. " + NO_DOWNLOAD_HINT
                )
            with (
                open(temp, "wb") as out,
                tqdm(
                    total=declared if declared is not None else size,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=Path(url).name,
                    leave=False,
                    disable=None,  # a bar on terminals, quiet in logs
                ) as bar,
            ):
                for chunk in response.iter_bytes():  # as the network delivers it (decoded if encoded)
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except httpx.RemoteProtocolError as exc:  # h11 noticed the body ended before Content-Length
        raise _Retryable(f"truncated body: connection closed after {received} bytes ({exc})") from None
    except httpx.TransportError as exc:  # refused, DNS, timeouts, connection reset
        raise _Retryable(f"{type(exc).__name__}: {exc or 'no details'} ({received} bytes received)") from None
    if declared is not None and received < declared:
        raise _Retryable(f"truncated body: {received} of {declared} bytes (Content-Length)")
    if size is not None and declared is None and received < size:
        raise _Retryable(f"truncated body: {received} of the expected {size} bytes")
    if (declared is not None and received != declared) or (size is not None and received != size):
        raise DataError(
            f"{Path(url).name} from {url} has {received} bytes, expected {size if size else declared}: "
            "the server holds a different file; nothing was kept. " + NO_DOWNLOAD_HINT
        )
    return received, digest.hexdigest()


def _content_length(response: Any) -> int | None:
    value = response.headers.get("Content-Length")
    encoding = response.headers.get("Content-Encoding", "identity").lower()
    if value is None or not value.isdigit() or encoding != "identity":
        return None
    return int(value)


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
    _check_train_covers_classes(folder, train, classmap)
    return OfficialData(train, test, classmap)


def _load_split(folder: Path, prefix: str, split: str, classmap: ClassMap) -> LabeledImages:
    names = official_file_names(prefix)
    images_role, labels_role = _split_roles(split)
    images = read_npz_array(folder / names[images_role])
    labels = read_npz_array(folder / names[labels_role])
    where = f"{folder / names[images_role]} + {names[labels_role]}"
    return validate_split(images, labels, len(classmap), where)


def _check_train_covers_classes(folder: Path, train: LabeledImages, classmap: ClassMap) -> None:
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


# ------------------------------------------------------------------------------------------ download stage


def fetch_raw(settings: Settings) -> Path:
    """The download stage: official download, local copy or synthetic generation into ``paths.raw``."""
    data = settings.data
    raw = settings.path("raw")
    raw.mkdir(parents=True, exist_ok=True)
    # The manifest marks a complete stage: it is dropped before any raw file changes, so a failed run
    # never looks complete, and written last.
    manifest_path = raw / MANIFEST_NAME
    if data.dataset in OFFICIAL_FILES:
        manifest_path.unlink(missing_ok=True)
        prefix = data.dataset
        base_url = data.base_url or OFFICIAL_BASE_URL.format(dataset=prefix)
        facts = OFFICIAL_FILES[prefix]
        # The cache outlives paths.raw (which DVC deletes before each run of this stage); it is keyed by
        # the official MD5s, so the official site and any mirror share it.
        cached = download_files(
            base_url,
            settings.path("downloads") / prefix,
            {name: fact.md5 for name, fact in facts.items()},
            data.download,
            sizes={name: fact.bytes for name, fact in facts.items()},
        )
        for path in cached:
            _link_or_copy(path, raw / path.name)
        source = base_url
    elif data.dataset == "local":
        assert data.local_dir is not None  # guaranteed by DataSettings
        folder = data.local_dir if data.local_dir.is_absolute() else settings.root / data.local_dir
        prefix = local_prefix(folder, data.local_prefix)
        load_official(folder, prefix)  # validate everything before touching paths.raw
        incoming = {name: md5_of(folder / name) for name in official_file_names(prefix).values()}
        _keep_official_downloads(raw, incoming, f"the files of {folder}")
        manifest_path.unlink(missing_ok=True)
        for name in official_file_names(prefix).values():
            if (raw / name).resolve() != (folder / name).resolve():
                _copy_file(folder / name, raw / name)
        source = str(folder.resolve())
    else:
        from pipeline import synthetic

        prefix = synthetic.PREFIX
        options = data.synthetic
        # The synthetic class map is the official one; every other file differs from a real download.
        incoming = {name: None for name in official_file_names(prefix).values()}
        incoming[official_file_names(prefix)["classmap"]] = OFFICIAL_CLASSMAP_MD5[prefix]
        _keep_official_downloads(raw, incoming, "the synthetic set")
        manifest_path.unlink(missing_ok=True)
        synthetic.generate(raw, options.train_per_class, options.test_per_class, options.seed)
        source = f"synthetic:seed={options.seed}"
    loaded = load_official(raw, prefix)  # the same validator for every source
    names = official_file_names(prefix).values()
    manifest = {
        "dataset": data.dataset,
        "source": source,
        "prefix": prefix,
        "files": {name: {"md5": md5_of(raw / name), "bytes": (raw / name).stat().st_size} for name in names},
        "n_train": len(loaded.train),
        "n_test": len(loaded.test),
        "n_classes": len(loaded.classmap),
    }
    write_json(manifest_path, manifest)
    logger.info("raw data ready in %s: %s", raw, {k: v for k, v in manifest.items() if k != "files"})
    return raw


def _keep_official_downloads(raw: Path, incoming: Mapping[str, str | None], what: str) -> None:
    """Refuse to overwrite a verified official file in ``raw`` with different content (MD5 ``incoming``)."""
    official = {fact.md5 for facts in OFFICIAL_FILES.values() for fact in facts.values()}
    clashes = [
        name
        for name, md5 in incoming.items()
        if (raw / name).is_file() and (current := md5_of(raw / name)) in official and current != md5
    ]
    if clashes:
        raise DataError(
            f"{raw} holds official downloaded files ({', '.join(clashes)}) that {what} would overwrite; "
            "nothing was changed. Move them away, or point paths.raw at another folder"
        )


def read_manifest(settings: Settings) -> dict[str, Any]:
    """The download stage's ``manifest.json`` (dataset, source, prefix, per-file md5/bytes, counts)."""
    path = settings.path("raw") / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path} not found: run the download stage first (`dvc repro download`)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); run the download stage again") from None


def _verified_raw_split(settings: Settings, split: str) -> tuple[LabeledImages, ClassMap, dict[str, Any]]:
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
    test, _, _ = _verified_raw_split(settings, "test")
    return test


# ------------------------------------------------------------------------------------------- prepare stage


def prepare(settings: Settings) -> dict[str, Any]:
    """The prepare stage: stratified train/val split, pixel statistics, data reports. Returns the summary."""
    from sklearn.model_selection import train_test_split

    train, classmap, manifest = _verified_raw_split(settings, "train")
    _check_train_covers_classes(settings.path("raw"), train, classmap)
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
