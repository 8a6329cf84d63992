"""Which stored model the service serves: a pinned tag wins; this checkout's recorded tag when the store
holds it; otherwise the store's latest (with a warning that the recorded one is missing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.contract import BENTO_MODEL_REPORT, recorded_bento_tag
from serving.model_choice import served_tag


def test_the_recorded_tag_is_read_from_the_package_report(tmp_path: Path) -> None:
    assert recorded_bento_tag(tmp_path) is None  # no package stage yet
    (tmp_path / BENTO_MODEL_REPORT).write_text(json.dumps({"tag": "kuzushiji-spinalvgg:abc"}), encoding="utf-8")
    assert recorded_bento_tag(tmp_path) == "kuzushiji-spinalvgg:abc"
    (tmp_path / BENTO_MODEL_REPORT).write_text("{not json", encoding="utf-8")
    assert recorded_bento_tag(tmp_path) is None


def test_pinned_wins_and_a_recorded_tag_missing_from_the_store_falls_back_to_latest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))  # an empty store
    assert served_tag("m:pinned", "m:recorded", "m") == ("m:pinned", "pinned by $KUZUSHIJI_BENTO_MODEL")
    tag, why = served_tag(None, "m:recorded", "m")
    assert (tag, "latest" in why) == ("m:latest", True)
    assert "m:recorded" in caplog.text
    assert served_tag(None, None, "m")[0] == "m:latest"
