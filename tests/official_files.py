"""Write small folders in the official K49/KMNIST file format for tests (any number of classes).

Images are random but class-dependent (a bright block whose position encodes the class, plus noise), white
ink on black, uint8 (N, 28, 28); labels uint8 like the official files. Each helper returns the paths so a
test can break one file at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.contract import (
    GLYPH_SIDE,
    NPZ_KEY,
    ClassMap,
    official_file_names,
    write_classmap,
)
from pipeline.data import (
    OFFICIAL_CLASSMAPS,
    md5_of,
    write_npz,
)

BLOCK = 6  # side of the class-coding block


def class_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Images whose bright block position depends on the label: easy to tell apart, never all black."""
    images = rng.integers(0, 40, size=(len(labels), GLYPH_SIDE, GLYPH_SIDE), dtype=np.uint8)
    cells = GLYPH_SIDE // BLOCK
    for index, label in enumerate(labels):
        row, col = divmod(int(label) % (cells * cells), cells)
        images[index, row * BLOCK : (row + 1) * BLOCK, col * BLOCK : (col + 1) * BLOCK] = 255
    return images


def write_official_folder(
    folder: Path,
    prefix: str = "kmnist",
    classmap: ClassMap | None = None,
    train_per_class: int = 12,
    test_per_class: int = 4,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the five official files for ``classmap`` (default: the KMNIST one) into ``folder``."""
    classmap = classmap or OFFICIAL_CLASSMAPS["kmnist"]
    rng = np.random.default_rng(seed)
    names = official_file_names(prefix)
    paths = {role: Path(folder) / name for role, name in names.items()}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(len(classmap), dtype=np.uint8), per_class))
        write_npz(paths[f"{split}_images"], {NPZ_KEY: class_images(labels, rng)})
        write_npz(paths[f"{split}_labels"], {NPZ_KEY: labels})
    write_classmap(classmap, paths["classmap"])
    return paths


def checksums(paths: dict[str, Path]) -> dict[str, str]:
    """File name -> MD5, the form ``pipeline.data.download_files`` expects."""
    return {path.name: md5_of(path) for path in paths.values()}
