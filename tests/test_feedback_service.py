"""POST /feedback on the session's real `bentoml serve` (tests/conftest.py ``served_tiny``): stored once in
its SQLite store, labels checked against the served class map, images checked like /predict, writes rate
limited per client address, a store that is down a 503 while /predict keeps answering."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image

from pipeline.feedback_store import FeedbackStore, store_url
from tests import bad_inputs
from tests.served_model import SHARED_FEEDBACK, SHARED_LIMITS

pytestmark = pytest.mark.slow


def _send(client: httpx.Client, image: bytes, label: str | None, **fields: str) -> httpx.Response:
    data = {**({"label": label} if label is not None else {}), **fields}
    return client.post("/feedback", files={"image": ("glyph.png", image, "image/png")}, data=data)


def _store(served) -> FeedbackStore:
    folder = Path(served["work"]) / "stores" / "feedback"
    return FeedbackStore(store_url(str(folder / "feedback.db"), folder))


def test_feedback_is_stored_once_with_its_glyph_and_the_served_version(served_tiny):
    client = served_tiny["client"]
    image = bad_inputs.scan_png("お", side=100)
    first = _send(client, image, "お", predicted="あ", model_version="7")
    assert first.status_code == 201, first.text
    body = first.json()
    assert isinstance(body["id"], int) and body["char"] == "お" and body["label"] == 4
    assert body["model_version"] == "7" and body["duplicate"] is False and 0 <= body["predicted"] < 10
    again = _send(client, image, "4")  # the same bytes and label, as an index
    assert again.status_code == 200 and again.json()["id"] == body["id"] and again.json()["duplicate"] is True
    other = _send(client, image, "か")  # the same image with another label is another item
    assert other.status_code == 201 and other.json()["id"] != body["id"]
    store = _store(served_tiny)
    stored = {item.id: item for item in store.list_items()}
    store.close()
    item = stored[body["id"]]
    assert item.label_char == "お" and item.glyph.shape == (28, 28) and item.model_version == "7"
    assert item.state == "new" and item.glyph.max() == 255  # white ink on black, as the model reads it


def test_a_label_outside_the_class_map_is_a_422_naming_the_labels(served_tiny):
    client, chars = served_tiny["client"], served_tiny["chars"]
    image = bad_inputs.scan_png("あ", side=101)
    for label in ("ん", "10", "-1", "x" * 300):
        response = _send(client, image, label)
        assert response.status_code == 422, (label, response.text)
        error = response.json()["error"]
        assert error["code"] == "invalid_label" and error["field"] == "label"
        assert [entry["char"] for entry in error["labels"]] == chars
        assert "0..9" in error["message"] and "あ" in error["message"]
    missing = _send(client, image, None)
    assert missing.status_code == 422 and missing.json()["error"]["code"] == "missing_field"
    bad_prediction = _send(client, image, "あ", predicted="ん")
    assert bad_prediction.status_code == 422 and bad_prediction.json()["error"]["field"] == "predicted"


def test_a_bad_image_is_refused_like_predict(served_tiny):
    client = served_tiny["client"]
    not_an_image = _send(client, b"hello, not a picture", "あ")
    assert not_an_image.status_code == 422 and not_an_image.json()["error"]["code"] == "invalid_image"
    blank = _send(client, bad_inputs.encode(Image.new("L", (64, 64), 255)), "あ")
    assert blank.status_code == 422
    too_large = _send(client, b"\x89PNG" + b"\0" * (SHARED_LIMITS["max_upload_bytes"] + 100_000), "あ")
    assert too_large.status_code == 413, too_large.text
    as_json = client.post("/feedback", json={"label": "あ"})
    assert as_json.status_code == 415 and "multipart/form-data" in as_json.json()["error"]["message"]
    stray = client.post("/feedback", files={"image": ("a.png", bad_inputs.scan_png("あ"), "image/png")},
                        data={"label": "あ", "comment": "hi"})
    assert stray.status_code == 400 and stray.json()["error"]["code"] == "unknown_field"


def test_writes_are_rate_limited_per_client_address(served_tiny):
    burst = SHARED_FEEDBACK["rate_burst"]
    transport = httpx.HTTPTransport(local_address="127.0.0.2")  # a client of its own: the others keep theirs
    with httpx.Client(base_url=served_tiny["url"], transport=transport, timeout=30) as other:
        statuses = [_send(other, bad_inputs.scan_png("き", side=60 + i), "き").status_code for i in range(burst + 3)]
        limited = _send(other, bad_inputs.scan_png("く", side=59), "く")
    assert statuses[:burst] == [201] * burst and 429 in statuses[burst:], statuses
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert re.search(r"retry in \d+ s", limited.json()["error"]["message"])
    assert _send(served_tiny["client"], bad_inputs.scan_png("く", side=58), "く").status_code == 201


def test_a_store_that_is_down_gets_503_and_predict_keeps_answering(served_tiny):
    client = served_tiny["client"]
    folder = Path(served_tiny["work"]) / "stores" / "feedback"
    assert _send(client, bad_inputs.scan_png("け", side=90), "け").status_code == 201  # the store exists
    moved = folder.with_name("feedback-moved")
    folder.rename(moved)
    folder.write_text("not a folder: the store cannot open")
    try:
        down = _send(client, bad_inputs.scan_png("け", side=91), "け")
        assert down.status_code == 503, down.text
        assert down.json()["error"]["code"] == "feedback_store_unavailable"
        assert "not saved" in down.json()["error"]["message"] and down.headers["retry-after"]
        predict = client.post("/predict", files={"image": ("a.png", bad_inputs.scan_png("け"), "image/png")})
        assert predict.status_code == 200
    finally:
        folder.unlink()
        shutil.move(moved, folder)
    back = _send(client, bad_inputs.scan_png("け", side=91), "け")
    assert back.status_code == 201, back.text  # the next write opens the store again


def test_the_classes_to_choose_from_and_the_feedback_metrics(served_tiny):
    client = served_tiny["client"]
    classes = client.get("/feedback").json()["classes"]
    assert [entry["char"] for entry in classes] == served_tiny["chars"]
    assert classes[0]["codepoint"] == "U+3042"
    assert _send(client, bad_inputs.scan_png("こ", side=80), "こ").status_code == 201
    assert _send(client, b"junk", "こ").status_code == 422
    text = client.get("/metrics").text
    received = re.search(r"^kuzushiji_feedback_received_total(?:\{[^}]*\})? (\S+)$", text, re.M)
    assert received and float(received.group(1)) >= 2
    assert re.search(r'^kuzushiji_feedback_outcomes_total\{[^}]*outcome="accepted"[^}]*\} [1-9]', text, re.M)
    assert re.search(r'^kuzushiji_feedback_outcomes_total\{[^}]*outcome="rejected"[^}]*\} [1-9]', text, re.M)
    assert re.search(r'^kuzushiji_feedback_agreement_total\{[^}]*agrees="(true|false)"[^}]*\} [1-9]', text, re.M)
