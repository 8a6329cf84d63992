"""Shared plotting helpers; the kana font ships in a pinned wheel, so figures render alike on every machine."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

FONT_PACKAGE = "japanize_matplotlib"
FONT_FILE = "fonts/ipaexg.ttf"


@lru_cache(maxsize=1)
def japanese_font_path() -> Path:
    """Path of the IPAexGothic TrueType font shipped by japanize-matplotlib."""
    path = Path(str(resources.files(FONT_PACKAGE).joinpath(FONT_FILE)))
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the pinned 'japanize-matplotlib' package ships the Japanese font; "
            "reinstall the environment with `make venv`"
        )
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: figures are files, never windows
    import matplotlib.pyplot as plt

    return plt


def font_properties(size: float = 10.0):
    from matplotlib.font_manager import FontProperties

    return FontProperties(fname=str(japanese_font_path()), size=size)


def save_image_grid(
    images: np.ndarray,
    titles: Sequence[str],
    path: Path,
    *,
    columns: int = 8,
    suptitle: str | None = None,
    title_colors: Sequence[str] | None = None,
) -> Path:
    """Save ``images`` (N, 28, 28) uint8/float as a grid with a (Japanese-capable) title per image."""
    plt = _pyplot()
    count = len(images)
    columns = max(1, min(columns, count))
    rows = max(1, -(-count // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.55 * rows + (0.4 if suptitle else 0)))
    flat = np.atleast_1d(axes).ravel()
    font = font_properties(9)
    for index, ax in enumerate(flat):
        ax.axis("off")
        if index < count:
            ax.imshow(images[index], cmap="gray", vmin=0, vmax=255 if images.dtype == np.uint8 else None)
            color = title_colors[index] if title_colors else "black"
            ax.set_title(titles[index], fontproperties=font, color=color, fontsize=9)
    if suptitle:
        fig.suptitle(suptitle, fontproperties=font_properties(11))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def new_figure(width: float, height: float):
    """A headless matplotlib (figure, axes) pair; callers save with ``save_figure``."""
    plt = _pyplot()
    return plt.subplots(figsize=(width, height))


def save_figure(fig, path: Path) -> Path:
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
