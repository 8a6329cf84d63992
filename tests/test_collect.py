"""The collect stage and prepare: accepted feedback exported in the official layout with a manifest, added to
the training split only; with no feedback, prepare's outputs are byte for byte what they were without it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import load_settings, write_params
from pipeline.contract import FEEDBACK_MANIFEST, DataError, load_classmap
from pipeline.data import md5_of, read_npz_array
from pipeline.feedback_store import ACCEPTED, REJECTED, Feedback, open_configured, upload_digest
from pipeline.stages import collect, download, prepare

SMALL = {"data.dataset": "synthetic", "data.synthetic.train_per_class": 12, "data.synthetic.test_per_class": 2}


@pytest.fixture
def settings(tmp_path, monkeypatch):
    path = write_params(tmp_path / "params.yaml", {"profile": "quick", **SMALL})
    monkeypatch.setenv("KUZUSHIJI_PARAMS", str(path))  # the review command reads the same settings
    loaded = load_settings(path)
    download.run(loaded)
    return loaded


def _prepared_md5s(settings) -> dict[str, str]:
    folder = settings.path("prepared")
    return {path.name: md5_of(path) for path in sorted(folder.iterdir())}


def _glyph(seed: int) -> np.ndarray:
    glyph = np.zeros((28, 28), dtype=np.uint8)
    glyph[4 + seed % 10: 20, 6:22] = 255  # a distinct block per seed
    glyph[10, seed % 28] = 128
    return glyph


def _add(store, seed: int, char: str) -> int:
    glyph = _glyph(seed)
    return store.add(Feedback(glyph, upload_digest(glyph.tobytes() + bytes([seed])), 0, char))[0]


def test_no_feedback_leaves_prepare_exactly_as_before(settings):
    prepare.run(settings)
    before = _prepared_md5s(settings)
    assert collect.run(settings) == {"accept": "reviewed", "n_items": 0, "max_id": 0}  # no store yet: nothing
    assert not (settings.root / "stores" / "feedback").exists()  # and reading did not create one
    summary = prepare.run(settings)
    assert _prepared_md5s(settings) == before and summary["n_feedback"] == 0
    first = {path.name: md5_of(path) for path in settings.path("feedback").iterdir()}
    collect.run(settings)
    assert {path.name: md5_of(path) for path in settings.path("feedback").iterdir()} == first  # DVC sees no change


def test_accepted_feedback_reaches_the_training_split_only(settings):
    prepare.run(settings)
    before = _prepared_md5s(settings)
    n_train = len(read_npz_array(settings.path("prepared") / "train.npz", "labels"))
    store = open_configured(settings.feedback, settings.root)
    assert store is not None
    ids = [_add(store, seed, char) for seed, char in enumerate("おおおかかきくけ")]
    store.review(ids[:6], ACCEPTED)
    store.review([ids[1]], REJECTED)  # the latest decision wins
    store.close()
    manifest = collect.run(settings)
    assert manifest["n_items"] == 5 and manifest["max_id"] == ids[5]
    folder = settings.path("feedback")
    written = json.loads((folder / FEEDBACK_MANIFEST).read_text(encoding="utf-8"))
    assert written["ids"] == [ids[0], *ids[2:6]] and written["per_class"] == {"お": 2, "か": 2, "き": 1}
    images = read_npz_array(folder / "feedback-train-imgs.npz")
    labels = read_npz_array(folder / "feedback-train-labels.npz")
    chars = load_classmap(folder / "feedback_classmap.csv").chars
    assert images.shape == (5, 28, 28) and [chars[i] for i in labels] == list("おおかかき")

    summary = prepare.run(settings)
    after = _prepared_md5s(settings)
    assert after["val.npz"] == before["val.npz"]  # the split that chooses the model never moves
    assert after["train.npz"] != before["train.npz"] and summary["n_feedback"] == 5
    train_images = read_npz_array(settings.path("prepared") / "train.npz", "images")
    train_labels = read_npz_array(settings.path("prepared") / "train.npz", "labels")
    assert len(train_labels) == n_train + 5
    classmap = load_classmap(settings.path("prepared") / "classmap.csv")
    for image, char in zip(images, "おおかかき", strict=True):
        found = np.flatnonzero((train_images == image).all(axis=(1, 2)))
        assert found.size == 1 and classmap.chars[train_labels[found[0]]] == char
    stats = json.loads((settings.path("prepared") / "stats.json").read_text(encoding="utf-8"))
    assert stats["feedback"] == {"items": 5, "max_id": ids[5]}

    everything = settings.with_overrides({"feedback.accept": "all"})
    assert collect.run(everything)["n_items"] == 7  # every item not rejected


def test_feedback_outside_the_datasets_classes_stops_prepare(settings):
    store = open_configured(settings.feedback, settings.root)
    assert store is not None
    store.review([_add(store, 0, "ゑ"), _add(store, 1, "Z")], ACCEPTED)
    store.close()
    collect.run(settings)
    with pytest.raises(DataError, match=r"\['Z'\].*review --reject"):
        prepare.run(settings)


def test_review_accepts_and_rejects_by_id_and_range_and_draws_a_contact_sheet(settings, tmp_path, capsys):
    assert collect.parse_ids("3,5-7, 9") == [3, 5, 6, 7, 9]
    store = open_configured(settings.feedback, settings.root)
    assert store is not None
    ids = [_add(store, seed, "あ") for seed in range(6)]
    store.close()
    sheet = tmp_path / "sheet.png"
    assert collect.review(["--sheet", str(sheet)]) == 0
    assert sheet.stat().st_size > 1000 and "6 new items" in capsys.readouterr().out
    assert collect.review(["--accept", f"{ids[0]}-{ids[3]}", "--reject", f"{ids[4]},999"]) == 0
    out = capsys.readouterr().out
    assert "accepted: 4 items" in out and "rejected: 1 items (no such ids: [999])" in out
    assert "1 new items" in out
    store = open_configured(settings.feedback, settings.root)
    assert store is not None and store.counts() == {"new": 1, "accepted": 4, "rejected": 1}
    store.close()
    with pytest.raises(SystemExit):
        collect.review(["--accept", "x-2"])
