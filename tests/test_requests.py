"""Request parsing, limits and micro-batching without a server (serving.requests, serving.limits, serving.batcher).

The HTTP behaviour of the same rules is covered end to end by tests/test_service.py (bad_inputs corpus).
"""

from __future__ import annotations

import asyncio
import base64
from http import HTTPStatus

import numpy as np
import pytest
from bentoml.exceptions import BentoMLException

from pipeline.contract import ClassMap
from pipeline.imaging import ImageLimits
from serving.batcher import MicroBatcher
from serving.errors import RequestRejected
from serving.limits import ByteBudget, RequestLimits, body_limit, declared_length
from serving.requests import (
    Upload,
    decode_glyphs,
    parse_body,
    parse_top_k,
    predict_batch_request,
    predict_request,
    request_pixels,
    top_classes,
)
from tests import bad_inputs

LIMITS = RequestLimits(
    max_upload_bytes=1000, max_pixels=10_000, max_pixels_per_request=15_000, max_images=3, max_request_bytes=2500,
    default_top_k=5,
)
BOUNDARY = "testboundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def multipart(*parts: tuple[str, str | None, bytes]) -> bytes:
    chunks = []
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename is not None else ""
        )
        chunks.append(f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(chunks) + f"--{BOUNDARY}--\r\n".encode()


def rejected(call, *args, **kwargs) -> RequestRejected:
    with pytest.raises(RequestRejected) as info:
        call(*args, **kwargs)
    return info.value


def test_rejection_is_a_bentoml_exception_with_the_status_and_our_error_shape():
    problem = RequestRejected(422, "invalid_top_k", "top_k must be a whole number", field="top_k")
    assert isinstance(problem, BentoMLException) and problem.error_code == HTTPStatus.UNPROCESSABLE_ENTITY
    assert problem.body() == {
        "error": {"code": "invalid_top_k", "message": "top_k must be a whole number", "field": "top_k"}
    }


def test_predict_request_takes_one_image_and_top_k():
    parsed = predict_request(multipart(("image", "a.png", b"png"), ("top_k", None, b" 2 ")), MULTIPART, LIMITS)
    assert [u.data for u in parsed.uploads] == [b"png"] and parsed.uploads[0].filename == "a.png"
    assert parsed.top_k == "2"


@pytest.mark.parametrize(
    ("body", "content_type", "status", "phrase"),
    [
        (multipart(("top_k", None, b"3")), MULTIPART, 422, "exactly one image"),
        (multipart(("image", "a", b"1"), ("image", "b", b"2")), MULTIPART, 422, "exactly one image"),
        (multipart(("picture", "a", b"1")), MULTIPART, 400, "unexpected form field"),
        (b"--x\r\n", "multipart/form-data", 400, "boundary"),
        (b"garbage without any boundary", "multipart/form-data; boundary=abc", 400, "malformed"),
        (b"raw", None, 415, "not accepted"),
        (b"raw", "image/png", 415, "not accepted"),
        (b'{"image": "abc"}', "application/json", 400, "image_base64"),
    ],
)
def test_bad_predict_requests(body, content_type, status, phrase):
    problem = rejected(predict_request, body, content_type, LIMITS)
    assert problem.status == status and phrase in problem.message


def test_batch_request_from_multipart_and_from_base64_json():
    parsed = predict_batch_request(multipart(("images", "a", b"1"), ("images", "b", b"2")), MULTIPART, LIMITS)
    assert [(u.filename, u.data) for u in parsed.uploads] == [("a", b"1"), ("b", b"2")]
    payload = b'{"images_base64": ["%s"], "top_k": 2}' % base64.b64encode(b"png")
    parsed = predict_batch_request(payload, "application/json; charset=utf-8", LIMITS)
    assert (
        [u.data for u in parsed.uploads] == [b"png"]
        and parsed.uploads[0].filename is None
        and parsed.top_k == 2
    )


@pytest.mark.parametrize(
    ("body", "content_type", "status", "phrase"),
    [
        (multipart(("top_k", None, b"2")), MULTIPART, 422, "no images"),
        (multipart(*[("images", f"{i}", b"x") for i in range(4)]), MULTIPART, 413, "split them"),
        (b"{not json", "application/json", 400, "not valid JSON"),
        (b'["a", "b"]', "application/json", 400, "images_base64"),
        (b'{"images_base64": [1, 2]}', "application/json", 422, "list of base64"),
        (b'{"images_base64": ["this is not base64!!"]}', "application/json", 422, "not valid base64"),
    ],
)
def test_bad_batch_requests(body, content_type, status, phrase):
    problem = rejected(predict_batch_request, body, content_type, LIMITS)
    assert problem.status == status and phrase in problem.message


def test_json_is_accepted_only_where_documented_in_the_415_message():
    assert "application/json" in rejected(parse_body, b"", "text/plain", True, LIMITS).message
    assert "application/json" not in rejected(parse_body, b"", "text/plain", False, LIMITS).message


def test_body_limits_bound_memory_before_reading():
    assert body_limit(MULTIPART, batch=False, limits=LIMITS) == min(1000 + 64 * 1024, 2500)
    assert body_limit("application/json", batch=True, limits=LIMITS) == 2500  # max_request_bytes binds
    assert declared_length("2500", 2500) == 2500 and declared_length(None, 2500) is None
    problem = rejected(declared_length, "2501", 2500)
    assert problem.status == 413 and "limit" in problem.message
    assert rejected(declared_length, "9" * 5000, 2500).status == 413  # no 5,000-digit int() or str()
    assert rejected(declared_length, "12abc", 2500).status == 400


@pytest.mark.parametrize(("value", "expected"), [(None, 5), ("", 5), ("3", 3), (" 7 ", 7), (49, 49)])
def test_top_k_accepted(value, expected):
    assert parse_top_k(value, num_classes=49, default=5) == expected


def test_top_k_default_is_capped_by_the_classes():
    assert parse_top_k(None, num_classes=3, default=5) == 3


@pytest.mark.parametrize(
    ("value", "phrase"),
    [
        ("0", "between 1 and 49"),
        ("1000", "between 1 and 49"),
        ("five", "whole number"),
        (2.5, "whole number"),
        (True, "whole number"),
        ("3.0", "whole number"),
    ],
)
def test_top_k_refused(value, phrase):
    problem = rejected(parse_top_k, value, num_classes=49, default=5)
    assert problem.status == 422 and problem.code == "invalid_top_k" and phrase in problem.message


def test_decode_glyphs_names_the_bad_image_by_position_and_file_name():
    good = Upload(bad_inputs.scan_png("あ", side=40), "ok.png")
    glyphs = decode_glyphs([good, good], ImageLimits(max_bytes=100_000, max_pixels=10_000), batch=True)
    assert glyphs.shape == (2, 28, 28) and glyphs.dtype == np.uint8
    problem = rejected(
        decode_glyphs,
        [good, Upload(b"nope", "bad.png")],
        ImageLimits(max_bytes=100_000, max_pixels=10_000),
        batch=True,
    )
    assert problem.status == 422 and "image 1 (bad.png)" in problem.message
    assert problem.body()["error"]["index"] == 1 and problem.body()["error"]["field"] == "images"


def test_top_classes_most_probable_first_with_the_class_map():
    classmap = ClassMap.from_chars("あいう")
    top = top_classes(np.array([0.2, 0.5, 0.3], dtype=np.float32), 2, classmap)
    assert [(t["index"], t["char"], t["codepoint"]) for t in top] == [
        (1, "い", "U+3044"),
        (2, "う", "U+3046"),
    ]
    assert top[0]["probability"] == pytest.approx(0.5)


def test_micro_batcher_merges_concurrent_calls_and_keeps_each_callers_rows():
    sizes: list[int] = []

    def engine(inputs: np.ndarray) -> np.ndarray:
        return inputs * 10

    async def scenario() -> list[np.ndarray]:
        batcher = MicroBatcher(engine, max_batch_size=4, on_batch=sizes.append)
        try:
            return await asyncio.gather(
                *(batcher.run(np.full((n, 1), i)) for i, n in enumerate([1, 2, 1, 3, 1]))
            )
        finally:
            batcher.close()

    results = asyncio.run(scenario())
    for i, (n, result) in enumerate(zip([1, 2, 1, 3, 1], results, strict=True)):
        np.testing.assert_array_equal(result, np.full((n, 1), i * 10))
    # All five were queued before the engine was free: merged into runs of at most 4 images (in order).
    assert sum(sizes) == 8 and max(sizes) <= 4 and len(sizes) < 5


def test_micro_batcher_passes_engine_errors_to_the_callers_and_keeps_serving():
    calls = []

    def engine(inputs: np.ndarray) -> np.ndarray:
        calls.append(len(inputs))
        if len(calls) == 1:
            raise RuntimeError("engine failed")
        return inputs

    async def scenario() -> np.ndarray:
        batcher = MicroBatcher(engine, max_batch_size=8)
        try:
            with pytest.raises(RuntimeError, match="engine failed"):
                await batcher.run(np.zeros((1, 1)))
            return await batcher.run(np.ones((2, 1)))
        finally:
            batcher.close()

    np.testing.assert_array_equal(asyncio.run(scenario()), np.ones((2, 1)))


def test_a_request_larger_than_the_batch_size_runs_whole():
    sizes: list[int] = []

    async def scenario() -> np.ndarray:
        batcher = MicroBatcher(lambda x: x, max_batch_size=2, on_batch=sizes.append)
        try:
            return await batcher.run(np.arange(5)[:, None])
        finally:
            batcher.close()

    assert len(asyncio.run(scenario())) == 5 and sizes == [5]


# ------------------------------------------------------------- hostile but cheap requests (issue 20)
@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"[" * 100_000, "application/json", 400, "invalid_json"),  # nested too deeply
        (b'{"images_base64":' * 50_000, "application/json", 400, "invalid_json"),
        (b'{"images_base64": ["QQ=="], "top_k": ' + b"9" * 5000 + b"}", "application/json", 400, "invalid_json"),
        (multipart(("images", "a", b"1")), "multipart/form-data; boundary=" + "b" * 300, 400, "bad_multipart"),
        (multipart(("images", "a", b"1"))[:-20], MULTIPART, 400, "bad_multipart"),  # no closing boundary
        (multipart(("images", "a", b"1"), ("top_k", None, b"2"), ("top_k", None, b"3")), MULTIPART, 422,
         "invalid_top_k"),
        (multipart(*[("images", "a", b"")] * 100_000), MULTIPART, 413, "too_many_parts"),
        (multipart(("images", "a", b"x" * 1001)), MULTIPART, 422, "invalid_image"),  # over max_upload_bytes
        (multipart(("images", "a", b"1"), ("top_k", None, b"1" * 2000)), MULTIPART, 422, "invalid_top_k"),
    ],
    ids=["deep arrays", "deep objects", "5000-digit number", "long boundary", "unterminated", "top_k twice",
         "100k empty parts", "file over its limit", "long top_k"],
)
def test_hostile_bodies_are_refused_at_once(body, content_type, status, code):
    problem = rejected(predict_batch_request, body, content_type, LIMITS)
    assert (problem.status, problem.code) == (status, code), problem.message


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 10**5000, "9" * 5000, "1e400", "Infinity", "٣", [3]],
                         ids=["inf", "nan", "huge int", "5000 digits", "1e400", "Infinity", "arabic digit", "list"])
def test_top_k_of_absurd_values_is_a_quick_422(value):
    problem = rejected(parse_top_k, value, num_classes=49, default=5)
    assert problem.status == 422 and problem.code == "invalid_top_k" and len(problem.message) < 300


def test_pixels_per_request_are_capped_from_the_headers():
    image = bad_inputs.encode(bad_inputs.Image.new("L", (100, 100), 0))  # 10,000 pixels each
    assert request_pixels([Upload(image)], LIMITS) == 10_000
    problem = rejected(request_pixels, [Upload(image), Upload(image)], LIMITS)
    assert problem.status == 413 and problem.code == "too_many_pixels"
    assert request_pixels([Upload(b"not an image")], LIMITS) == 0  # the decoder names that problem


def test_byte_budget_queues_then_refuses_with_503():
    async def scenario() -> tuple[int, RequestRejected]:
        budget = ByteBudget(capacity=100, timeout_s=0.05)
        async with budget.reserve(40):  # holds 80 (a body and its parsed copy)
            async with budget.reserve(5):  # small ones still fit
                pass
            with pytest.raises(RequestRejected) as refused:
                async with budget.reserve(40):
                    pass
        async with budget.reserve(40):  # room again once released
            held = budget.used
        return held, refused.value

    held, refused = asyncio.run(scenario())
    assert held == 80 and refused.status == 503 and refused.code == "overloaded"


def test_a_waiting_request_goes_when_room_is_freed():
    async def scenario() -> list[str]:
        budget, order = ByteBudget(capacity=100, timeout_s=2.0), []

        async def hold(name: str, size: int, seconds: float) -> None:
            async with budget.reserve(size):
                order.append(name)
                await asyncio.sleep(seconds)

        await asyncio.gather(hold("first", 50, 0.05), hold("second", 50, 0))
        return order

    assert asyncio.run(scenario()) == ["first", "second"]
