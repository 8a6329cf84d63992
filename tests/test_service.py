"""End to end: a real `bentoml serve` on 127.0.0.1 serving a SpinalVGG trained seconds on rendered glyphs.

The one server of the session (``served_tiny`` in tests/conftest.py, shared with the page tests): the
model is trained, exported to ONNX, imported into a BentoML store under tmp and served; every test talks
HTTP to it, hostile requests included (each must get its JSON answer within a few seconds).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.contract import READINGS, Trust, onnx_session
from pipeline.imaging import ImageLimits, load_glyph
from tests import bad_inputs
from tests.served_model import SHARED_LIMITS, TRAIN_CLASSES
from tests.support import PROJECT_ROOT

pytestmark = pytest.mark.slow

TOP_K = SHARED_LIMITS["top_k"]
MAX_BATCH_IMAGES = SHARED_LIMITS["max_images_per_request"]
MAX_UPLOAD_BYTES = SHARED_LIMITS["max_upload_bytes"]
MAX_REQUEST_BYTES = SHARED_LIMITS["max_request_bytes"]


@pytest.fixture
def server(served_tiny):
    return served_tiny


def _png(char: str) -> bytes:
    return bad_inputs.scan_png(char)


def test_predict_returns_the_documented_shape(server):
    response = server["client"].post("/predict", files={"image": ("a.png", _png("あ"), "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) <= {"model_version", "confident", "in_domain", "reason", "predictions"}
    assert {"model_version", "confident", "in_domain", "predictions"} <= set(body)
    assert body["model_version"] == "7"
    assert response.headers["x-model-version"] == "7"
    assert response.headers["x-bento-model"] == server["tag"]
    predictions = body["predictions"]
    assert len(predictions) == TOP_K  # serve.top_k from the params file
    for item in predictions:
        assert set(item) == {"index", "char", "codepoint", "reading", "probability"}
        assert server["chars"][item["index"]] == item["char"]
        assert item["reading"] == READINGS[item["char"]]
        assert item["codepoint"] == f"U+{ord(item['char']):04X}"
    probabilities = [item["probability"] for item in predictions]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1.0 + 1e-6


def test_answers_say_whether_they_are_sure_and_whether_the_image_is_a_kana(server):
    """The verdicts are the model's thresholds (meta.json) applied to its calibrated ONNX logits, for kana
    and for images that are none (noise, a digit); each batch entry carries its own."""
    work = server["work"]
    trust = Trust.from_meta(json.loads((work / "meta.json").read_text(encoding="utf-8")))
    assert trust is not None and trust.temperature > 0
    session = onnx_session(work / "model.onnx")
    rng = np.random.default_rng(0)
    noise = bad_inputs.encode(Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)))
    images = {"a.png": _png("あ"), "ko.png": _png("こ"), "seven.png": _png("7"), "noise.png": noise}
    files = [("images", (name, data, "image/png")) for name, data in images.items()]
    batch = server["client"].post("/predict_batch", files=files)
    assert batch.status_code == 200, batch.text
    seen = set()
    for (name, data), result in zip(images.items(), batch.json()["results"], strict=True):
        glyph = load_glyph(data, ImageLimits(10**7, 10**7)).astype(np.float32)[None, None]
        (logits,) = session.run(["logits"], {"images": glyph})
        expected = trust.judge(logits)[0]
        single = server["client"].post("/predict", files={"image": (name, data, "image/png")}).json()
        for answer in (result, single):
            assert {key: answer.get(key) for key in ("confident", "in_domain")} == \
                {key: expected[key] for key in ("confident", "in_domain")}, name
            assert ("reason" in answer) == (not answer["in_domain"]), answer
            assert len(answer["predictions"]) == TOP_K  # the top guesses stay available
        seen.add(result["in_domain"])
    assert seen == {True, False}, "one kana and one non-kana at least, or the test shows nothing"


def test_the_new_fields_are_in_the_openapi_schema(server):
    spec = server["client"].get("/docs.json").json()
    text = json.dumps(spec)
    schemas = spec["components"]["schemas"]
    with_verdicts = [name for name, schema in schemas.items()
                     if {"confident", "in_domain", "reason", "predictions"} <= set(schema.get("properties", {}))]
    assert len(with_verdicts) >= 2, sorted(schemas)  # /predict's answer and each /predict_batch result
    assert any("reading" in schema.get("properties", {}) for schema in schemas.values()), sorted(schemas)
    assert "not sure" in text and "kana the model knows" in text


def test_top_k_option(server):
    response = server["client"].post("/predict", files={"image": ("a.png", _png("い"), "image/png")},
                                     data={"top_k": "1"})
    assert response.status_code == 200 and len(response.json()["predictions"]) == 1
    everything = server["client"].post("/predict", files={"image": ("a.png", _png("い"), "image/png")},
                                       data={"top_k": str(TRAIN_CLASSES)}).json()["predictions"]
    assert sorted(item["index"] for item in everything) == list(range(TRAIN_CLASSES))
    assert sum(item["probability"] for item in everything) == pytest.approx(1.0, abs=1e-4)


def test_trained_classes_come_back_in_the_top_k(server):
    hits = []
    for index, char in enumerate(server["chars"]):
        body = server["client"].post("/predict", files={"image": (f"{char}.png", _png(char), "image/png")}).json()
        hits.append(index in [item["index"] for item in body["predictions"]])
    # A drawing at another scale and stroke width than the training renders: most must be recognised.
    assert sum(hits) >= TRAIN_CLASSES - 2, hits
    assert hits[0], "あ, a class used in training, is not in the top-k"


def test_predict_batch_agrees_with_predict(server):
    client = server["client"]
    chars = server["chars"][:4]
    files = [("images", (f"{c}.png", _png(c), "image/png")) for c in chars]
    batch = client.post("/predict_batch", files=files, data={"top_k": "4"})
    assert batch.status_code == 200, batch.text
    body = batch.json()
    assert body["model_version"] == "7" and batch.headers["x-model-version"] == "7"
    assert [result["filename"] for result in body["results"]] == [f"{c}.png" for c in chars]
    for char, result in zip(chars, body["results"], strict=True):
        single = client.post("/predict", files={"image": ("x.png", _png(char), "image/png")},
                             data={"top_k": "4"}).json()["predictions"]
        assert [p["index"] for p in single] == [p["index"] for p in result["predictions"]]
        np.testing.assert_allclose([p["probability"] for p in single],
                                   [p["probability"] for p in result["predictions"]], atol=1e-5)


def test_predict_batch_accepts_base64_json(server):
    chars = server["chars"][:2]
    payload = {"images_base64": [base64.b64encode(_png(c)).decode() for c in chars], "top_k": 2}
    response = server["client"].post("/predict_batch", json=payload)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 2 and all(r["filename"] is None and len(r["predictions"]) == 2 for r in results)


@pytest.mark.parametrize("name", sorted(bad_inputs.ODD_BUT_VALID))
def test_unusual_images_are_classified(server, name):
    response = server["client"].post(
        "/predict", files={"image": ("odd", bad_inputs.ODD_BUT_VALID[name]("あ"), "application/octet-stream")}
    )
    assert response.status_code == 200, f"{name}: {response.text}"
    assert len(response.json()["predictions"]) == TOP_K


def test_bad_requests_get_clear_4xx_errors_and_the_server_keeps_serving(server):
    client = server["client"]
    corpus = bad_inputs.bad_requests(_png("あ"), MAX_UPLOAD_BYTES, MAX_BATCH_IMAGES, MAX_REQUEST_BYTES)
    assert len(corpus) >= 20
    failures = []
    for bad in corpus:
        response = bad.send(client)
        try:
            error = response.json()["error"]
            ok = (response.status_code == bad.expect_status and bad.expect_phrase.lower() in error["message"].lower()
                  and error["code"])
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            failures.append(f"{bad.name}: HTTP {response.status_code} {response.text[:300]}")
        assert response.headers.get("x-model-version") == "7"
    assert not failures, "\n".join(failures)
    assert server["process"].poll() is None
    still = client.post("/predict", files={"image": ("a.png", _png("あ"), "image/png")})
    assert still.status_code == 200


def test_requests_leave_nothing_on_disk(server):
    home = Path(server["env"]["BENTOML_HOME"])
    before = sorted(str(p) for p in home.rglob("*"))
    tmp_before = set(os.listdir("/tmp")) if os.path.isdir("/tmp") else set()
    for _ in range(3):
        server["client"].post("/predict", files={"image": ("a.png", _png("う"), "image/png")})
        server["client"].post("/predict_batch", files=[("images", ("a.png", _png("う"), "image/png"))] * 3)
    assert sorted(str(p) for p in home.rglob("*")) == before
    assert not {name for name in set(os.listdir("/tmp")) - tmp_before if "bentoml" in name.lower()}


def test_ops_endpoints(server):
    client = server["client"]
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200
    version = client.get("/version")
    assert version.status_code == 200
    info = version.json()
    assert info["registry_version"] == "7" and info["bento_model"] == server["tag"]
    assert info["num_classes"] == TRAIN_CLASSES and info["dataset"] == "synthetic"
    assert info["tta_rotations_deg"] == []  # the views the served graph averages: this tiny model has none
    client.post("/predict", files={"image": ("a.png", _png("え"), "image/png")})
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    text = metrics.text
    assert "bentoml_service_request_duration_seconds" in text
    assert "kuzushiji_images_total" in text and "kuzushiji_request_images" in text
    assert "kuzushiji_engine_batch_images" in text  # the micro-batcher's images per ONNX Runtime run
    docs = client.get("/docs.json").json()
    assert "/predict" in docs["paths"] and "/predict_batch" in docs["paths"]


def test_bento_builds_without_mlflow_or_torch(server, tmp_path):
    result = subprocess.run(
        [str(Path(sys.executable).with_name("bentoml")), "build", "--output", "tag"],
        cwd=PROJECT_ROOT, env={**os.environ, **server["env"]}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    bentos = list((Path(server["env"]["BENTOML_HOME"]) / "bentos").rglob("bento.yaml"))
    assert bentos
    manifest = yaml.safe_load(bentos[0].read_text(encoding="utf-8"))
    packed_models = {m["tag"] for svc in manifest["services"] for m in svc.get("models", [])}
    assert packed_models == {server["tag"]}  # both services reference the one stored model
    src = bentos[0].parent / "src"
    packed = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
    assert "service.py" in packed and "pipeline/imaging.py" in packed and "params.yaml" in packed
    assert {"page/index.html", "page/page.js", "page/page.css", "page/docs.html"} <= set(packed)  # the page at /
    assert {"page/feedback.js", "pipeline/feedback_store.py", "pipeline/databases.py"} <= set(packed)  # /feedback
    assert not any(name.startswith(("pipeline/train", "pipeline/model", "tests/")) for name in packed)
    requirements = (bentos[0].parent / "env" / "python" / "requirements.txt").read_text(encoding="utf-8")
    assert "onnxruntime==" in requirements and "torch" not in requirements and "mlflow" not in requirements
    assert "sqlalchemy==" in requirements.lower() and "psycopg==" in requirements  # the feedback store


# ------------------------------------------------------------------------------ issue 20: no hangs
ANSWER_WITHIN_S = 5.0  # a hostile request's JSON answer; the old hangs took 30 s


def _is_error_json(response_status: int, body: bytes) -> dict:
    import json

    error = json.loads(body)["error"]
    assert set(error) >= {"code", "message"} and isinstance(error["code"], str), body[:300]
    assert response_status >= 400
    return error


def test_hostile_requests_get_a_4xx_json_at_once(server):
    import httpx

    corpus = bad_inputs.hostile_requests(_png("あ"), SHARED_LIMITS["max_pixels_per_request"])
    failures = []
    with httpx.Client(base_url=server["url"], timeout=ANSWER_WITHIN_S) as client:
        for bad in corpus:
            response = bad.send(client)  # an httpx timeout here is a hang
            try:
                error = _is_error_json(response.status_code, response.content)
                ok = response.status_code == bad.expect_status and bad.expect_phrase.lower() in error["message"].lower()
            except (ValueError, KeyError, TypeError, AssertionError):
                ok = False
            if not ok:
                failures.append(f"{bad.name}: HTTP {response.status_code} {response.text[:300]}")
        assert not failures, "\n".join(failures)
        assert client.post("/predict", files={"image": ("a.png", _png("あ"), "image/png")}).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [("GET", "/no/such/page", 404, "not_found"), ("GET", "/predict", 405, "method_not_allowed"),
     ("DELETE", "/version", 405, "method_not_allowed"), ("GET", "/page/missing.js", 404, "not_found")],
)
def test_framework_errors_have_the_one_shape(server, method, path, status, code):
    response = server["client"].request(method, path)
    assert response.status_code == status
    assert _is_error_json(status, response.content)["code"] == code
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers.get("x-model-version") == "7"


def test_a_trailing_slash_is_served_not_redirected(server):
    response = server["client"].post("/predict/", files={"image": ("a.png", _png("あ"), "image/png")})
    assert response.status_code == 200 and response.json()["predictions"]


def test_a_body_shorter_than_its_content_length_gets_408(server):
    head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 5000\r\n\r\n")
    status, headers, body = bad_inputs.raw_http(server["port"], head + b"--b\r\n", timeout_s=ANSWER_WITHIN_S)
    assert status == 408 and _is_error_json(status, body)["code"] == "body_timeout"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /livez HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(5000)) + b"\r\n", 431),
        (b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", 431),
        (b"GET /livez HTTP/1.1\r\nHost: x\r\n", 408),  # headers never finished
        (b"\x16\x03\x01 not http at all\r\n\r\n", 400),
        (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n", 400),
    ],
    ids=["5000 headers", "100 KB header", "unfinished headers", "not HTTP", "bad content-length"],
)
def test_the_http_layer_refuses_in_json(server, request_bytes, status):
    got, headers, body = bad_inputs.raw_http(server["port"], request_bytes, timeout_s=ANSWER_WITHIN_S)
    assert got == status, body[:300]
    _is_error_json(got, body)
    assert headers.get("connection") == "close"


def test_a_burst_of_large_bodies_waits_for_the_worker_budget_then_gets_503(server):
    import socket

    size = MAX_REQUEST_BYTES - 1000  # reserves twice that: the worker's budget holds one at a time
    head = (f"POST /predict_batch HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {size}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=ANSWER_WITHIN_S) as holder:
        holder.sendall(head)  # announced, never sent: holds the budget until its body times out
        import time

        time.sleep(0.2)
        status, headers, body = bad_inputs.raw_http(server["port"], head + b"x" * 10, timeout_s=ANSWER_WITHIN_S)
        assert status == 503 and _is_error_json(status, body)["code"] == "overloaded"
        assert headers.get("retry-after")
    still = server["client"].post("/predict", files={"image": ("a.png", _png("あ"), "image/png")})
    assert still.status_code == 200


def test_metric_labels_come_only_from_known_routes(server):
    client = server["client"]
    for i in range(200):
        assert client.get(f"/random-{i}-path").status_code == 404
    text = client.get("/metrics").text
    assert "random-" not in text and 'endpoint="/~unknown"' in text
    assert len(text) < 500_000


def test_the_metrics_folder_is_the_servers_own(server):
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml.serving import ensure_prometheus_dir

    # What any other BentoML server started under the same home does first: wipe the shared folder.
    home = Path(server["env"]["BENTOML_HOME"])
    previous = BentoMLContainer.prometheus_multiproc_dir.get()
    try:
        BentoMLContainer.prometheus_multiproc_dir.set(str(home / "prometheus_multiproc_dir"))
        ensure_prometheus_dir()
    finally:
        BentoMLContainer.prometheus_multiproc_dir.set(previous)
    own = list(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"kuzushiji-metrics-{server['process'].pid}"))
    assert own and any(own[0].iterdir()), "the server keeps its metric files in a folder of its own"
    server["client"].post("/predict", files={"image": ("a.png", _png("い"), "image/png")})
    assert "kuzushiji_images_total" in server["client"].get("/metrics").text


def test_openapi_info_is_the_services_own(server):
    spec = server["client"].get("/docs.json").json()
    info = spec["info"]
    assert info["title"] == "Kuzushiji kana reader"
    assert info["version"] != "None" and "v" in info["version"]
    assert server["tag"] in info["description"] and "/version" in info["description"]
    assert "contact" not in info and "Slack" not in json.dumps(info)
    assert spec["paths"]["/predict"]  # the rest of BentoML's document is kept


def test_version_says_which_model_and_why(server):
    version = server["client"].get("/version").json()
    assert version["bento_model"] == server["tag"]
    assert version["model_source"]  # pinned, recorded by this checkout's package stage, or the latest


def test_the_admin_endpoint_is_off_without_a_token(server):
    response = server["client"].post("/admin/reload", headers={"Authorization": "Bearer anything"})
    assert response.status_code == 404, response.text
    assert "KUZUSHIJI_ADMIN_TOKEN" in response.json()["error"]["message"]
    assert server["client"].get("/version").json()["registry_version"] == "7"
