"""POST /feedback's rules as pure functions: parts, labels against the class map, the per-client allowance."""

from __future__ import annotations

import pytest

from pipeline.contract import ClassMap
from serving.errors import RequestRejected
from serving.feedback import RateLimiter, class_list, feedback_request, resolve_class
from serving.limits import RequestLimits
from tests.bad_inputs import multipart_raw

CLASSES = ClassMap.from_chars("あいうえお")
LIMITS = RequestLimits(max_upload_bytes=1000, max_pixels=10**6, max_pixels_per_request=10**6, max_images=4,
                       max_request_bytes=10**5, default_top_k=3)
TYPE = "multipart/form-data; boundary=b"


def _body(*parts: tuple[str, str | None, bytes]) -> bytes:
    return multipart_raw(list(parts))


@pytest.mark.parametrize(("text", "index"), [("お", 4), ("4", 4), (" 0 ", 0), ("U+3044", 1), ("u+3044", 1)])
def test_a_class_is_its_character_index_or_code_point(text, index):
    assert resolve_class(text, CLASSES, "label") == index


@pytest.mark.parametrize("text", ["ん", "5", "-1", "04a", "", "あい"])
def test_anything_else_is_a_422_with_the_classes(text):
    with pytest.raises(RequestRejected) as raised:
        resolve_class(text, CLASSES, "label")
    assert raised.value.status == 422 and raised.value.extra["labels"] == class_list(CLASSES)
    assert "0..4" in raised.value.message and "あ い う え お" in raised.value.message


def test_the_parts_of_a_correction():
    sent = feedback_request(_body(("image", "a.png", b"png"), ("label", None, "う".encode()),
                                  ("predicted", None, b"1"), ("model_version", None, b"7")), TYPE, LIMITS, CLASSES)
    assert (sent.upload.data, sent.label, sent.predicted, sent.model_version) == (b"png", 2, 1, "7")


@pytest.mark.parametrize(("parts", "status", "code"), [
    ([("label", None, b"1")], 422, "missing_field"),
    ([("image", "a.png", b"x")], 422, "missing_field"),
    ([("image", "a.png", b"x"), ("image", "b.png", b"y"), ("label", None, b"1")], 422, "too_many_images"),
    ([("image", "a.png", b"x"), ("label", None, b"1"), ("label", None, b"2")], 422, "invalid_label"),
    ([("image", "a.png", b"x" * 1001), ("label", None, b"1")], 422, "invalid_image"),
    ([("image", "a.png", b"x"), ("label", None, b"1"), ("note", None, b"hi")], 400, "unknown_field"),
    ([("image", "a.png", b"x"), ("label", None, b"1"), ("model_version", None, b"7; drop")], 422,
     "invalid_model_version"),
])
def test_bad_parts_are_named(parts, status, code):
    with pytest.raises(RequestRejected) as raised:
        feedback_request(_body(*parts), TYPE, LIMITS, CLASSES)
    assert (raised.value.status, raised.value.code) == (status, code)


def test_only_multipart_is_accepted():
    with pytest.raises(RequestRejected) as raised:
        feedback_request(b"{}", "application/json", LIMITS, CLASSES)
    assert raised.value.status == 415 and "curl -F image=@glyph.png -F label=" in raised.value.message


def test_each_client_has_its_own_allowance_refilled_over_time():
    limiter = RateLimiter(per_minute=60, burst=3)
    for _ in range(3):
        limiter.take("a", now=0.0)
    with pytest.raises(RequestRejected) as raised:
        limiter.take("a", now=0.5)
    assert raised.value.status == 429 and raised.value.extra["retry_after_s"] == 1
    limiter.take("b", now=0.5)  # another client is not affected
    limiter.take("a", now=1.6)  # one write a second comes back


def test_the_allowances_held_are_bounded():
    limiter = RateLimiter(per_minute=60, burst=1, max_clients=100)
    for client in range(1000):
        limiter.take(f"10.0.{client // 256}.{client % 256}", now=float(client))
    assert len(limiter.buckets) == 100
