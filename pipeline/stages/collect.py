"""The collect stage: the accepted feedback of the store, exported in the official file layout with a
manifest, so DVC versions it and prepare adds it to the training split. ``review``: a contact sheet of the
new items and accept/reject by id or range (``python -m pipeline.stages.collect review --help``)."""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Settings, load_settings
from pipeline.contract import (
    FEEDBACK_MANIFEST,
    FEEDBACK_PREFIX,
    GLYPH_SIDE,
    NPZ_KEY,
    ClassMap,
    write_classmap,
)
from pipeline.data import md5_of, write_npz
from pipeline.feedback_store import ACCEPTED, NEW, REJECTED, StoredItem, accepted_items, open_configured
from pipeline.files import write_json

logger = logging.getLogger(__name__)
SHEET_MAX_ITEMS = 200  # one contact sheet; review the rest afterwards


def export(items: Sequence[StoredItem], out: Path, accept: str) -> dict[str, Any]:
    """Write the items as ``feedback-train-*.npz`` + class map + manifest; byte-identical for equal items."""
    chars = sorted({item.label_char for item in items})
    classmap = ClassMap.from_chars(tuple(chars))
    index = {char: i for i, char in enumerate(chars)}
    images = (np.stack([item.glyph for item in items]) if items
              else np.zeros((0, GLYPH_SIDE, GLYPH_SIDE), dtype=np.uint8))
    labels = np.array([index[item.label_char] for item in items], dtype=np.uint8)
    files = {f"{FEEDBACK_PREFIX}-train-imgs.npz": images, f"{FEEDBACK_PREFIX}-train-labels.npz": labels}
    for name, array in files.items():
        write_npz(out / name, {NPZ_KEY: array})
    classmap_name = f"{FEEDBACK_PREFIX}_classmap.csv"
    write_classmap(classmap, out / classmap_name)
    manifest = {
        "accept": accept,
        "n_items": len(items),
        "max_id": max((item.id for item in items), default=0),
        "per_class": dict(sorted(Counter(item.label_char for item in items).items())),
        "ids": [item.id for item in items],
        "files": {name: md5_of(out / name) for name in (*files, classmap_name)},
    }
    write_json(out / FEEDBACK_MANIFEST, manifest)
    return manifest


def run(settings: Settings) -> dict[str, Any]:
    """Collect stage: export what ``feedback.accept`` counts (nothing when there is no store yet)."""
    items = accepted_items(settings.feedback, settings.root)
    manifest = export(items, settings.path("feedback"), settings.feedback.accept)
    summary = {key: manifest[key] for key in ("accept", "n_items", "max_id")}
    logger.info("collected %s feedback items into %s", summary["n_items"], settings.path("feedback"))
    return summary


def parse_ids(text: str) -> list[int]:
    """``3,5-9,12`` -> [3, 5, 6, 7, 8, 9, 12]."""
    ids: list[int] = []
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise argparse.ArgumentTypeError(f"{part!r}: give ids as 3 or ranges as 5-9, separated by commas")
        ids.extend(range(int(low), int(high or low) + 1))
    return ids


def contact_sheet(items: Sequence[StoredItem], path: Path) -> Path:
    """The items as one PNG: each glyph titled with its id, its label and (in brackets) the model's reading."""
    from pipeline.figures import save_image_grid

    shown = list(items)[:SHEET_MAX_ITEMS]
    titles = [f"#{item.id} {item.label_char}" + ("" if item.predicted is None else f" ({item.predicted})")
              for item in shown]
    return save_image_grid(np.stack([item.glyph for item in shown]), titles, path,
                           columns=int(np.ceil(np.sqrt(len(shown)))),
                           suptitle=f"{len(shown)} feedback items: #id label (model's top-1 index)")


def review(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stages.collect review",
                                     description="Show feedback items and accept or reject them by id or range.")
    parser.add_argument("--state", choices=(NEW, ACCEPTED, REJECTED, "any"), default=NEW,
                        help="which items the sheet and the list show (default: new)")
    parser.add_argument("--sheet", type=Path, default=None, help="write the contact sheet PNG here")
    parser.add_argument("--accept", type=parse_ids, default=[], metavar="IDS", help="e.g. 1-40,45")
    parser.add_argument("--reject", type=parse_ids, default=[], metavar="IDS")
    parser.add_argument("--reviewer", default=None)
    args = parser.parse_args(argv)
    settings = load_settings()
    store = open_configured(settings.feedback, settings.root)
    assert store is not None
    try:
        for decision, ids in ((ACCEPTED, args.accept), (REJECTED, args.reject)):
            if ids:
                done = store.review(ids, decision, args.reviewer)
                missing = sorted(set(ids) - set(done))
                print(f"{decision}: {len(done)} items" + (f" (no such ids: {missing[:20]})" if missing else ""))
        items = store.list_items(None if args.state == "any" else (args.state,))
        print(f"{len(items)} {args.state} items; all: {store.counts()}")
        for item in items[:SHEET_MAX_ITEMS]:
            print(f"  #{item.id}  {item.label_char}  model said {item.predicted}  (v{item.model_version})")
        if args.sheet is not None and items:
            print(f"contact sheet: {contact_sheet(items, args.sheet)}")
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] != ["review"]:
        sys.exit("usage: python -m pipeline.stages.collect review [--sheet PNG] [--accept IDS] [--reject IDS]")
    raise SystemExit(review(sys.argv[2:]))
