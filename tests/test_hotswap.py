"""End to end: a running `bentoml serve` with two workers swaps in a new champion from its BentoML store on
``POST /admin/reload``, under a ``wrk`` load that sees no error; a corrupt model leaves the old one serving."""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.load import multipart_body, require_wrk, wrk
from tests import bad_inputs
from tests.served_model import REGISTRY_VERSION, serve_tiny_model, store_bundle

pytestmark = pytest.mark.slow

TOKEN = "test-admin-token-0123456789abcdef"
WORKERS = 2
FOLLOW_S = 0.2


@pytest.fixture(scope="module")
def swappable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with serve_tiny_model(tmp_path_factory.mktemp("swap"), {"reload_follow_s": FOLLOW_S}, workers=WORKERS,
                          extra_env={"KUZUSHIJI_ADMIN_TOKEN": TOKEN}) as served:
        yield served


def _reload(served: dict[str, Any], token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return served["client"].post("/admin/reload", headers=headers)


def _served_versions(served: dict[str, Any]) -> dict[str, set[str]]:
    """registry version -> the worker pids whose kuzushiji_served_model gauge is 1 for it (from /metrics)."""
    versions: dict[str, set[str]] = {}
    for line in served["client"].get("/metrics").text.splitlines():
        if line.startswith("kuzushiji_served_model{") and line.endswith(" 1.0"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            versions.setdefault(labels["registry_version"], set()).add(labels["pid"])
    return versions


def _wait_for_all_workers(served: dict[str, Any], version: str, timeout_s: float = 20.0) -> dict[str, set[str]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        versions = _served_versions(served)
        if set(versions) == {version} and len(versions[version]) == WORKERS:
            return versions
        time.sleep(0.1)
    return _served_versions(served)


def test_the_reload_endpoint_needs_the_token(swappable: dict[str, Any]) -> None:
    missing = _reload(swappable, token=None)
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    assert missing.json()["error"]["code"] == "unauthorized"
    wrong = _reload(swappable, token="not-the-token")
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden"
    assert swappable["client"].get("/admin/reload").status_code == 405


def test_a_new_champion_is_swapped_in_under_load_without_an_error(swappable: dict[str, Any], tmp_path: Path) -> None:
    client, work = swappable["client"], swappable["work"]
    assert client.get("/version").json()["registry_version"] == REGISTRY_VERSION
    new_tag = store_bundle(work, "8", swappable["env"])  # the same files, a new registry version: a new model
    assert client.get("/version").json()["registry_version"] == REGISTRY_VERSION  # polling is off: no swap yet
    body = tmp_path / "body"
    body.write_bytes(multipart_body("image", [bad_inputs.scan_png("あ")]))
    load: dict[str, Any] = {}
    require_wrk()
    generator = threading.Thread(target=lambda: load.update(wrk(f"{swappable['url']}/predict", body, 8, 4)))
    generator.start()
    time.sleep(1.5)
    answer = _reload(swappable)
    generator.join()
    assert answer.status_code == 200, answer.text
    assert answer.json()["swapped"] is True and answer.json()["model"]["bento_model"] == new_tag
    assert answer.headers["x-model-version"] == "8"
    assert load["requests"] > 0 and load["errors"] == 0, load  # wrk: no connect/read/write error, all 2xx
    versions = _wait_for_all_workers(swappable, "8")
    assert set(versions) == {"8"} and len(versions["8"]) == WORKERS, versions  # every worker swapped
    version = client.get("/version").json()
    assert version["registry_version"] == "8" and version["bento_model"] == new_tag
    predicted = client.post("/predict", files={"image": ("a.png", bad_inputs.scan_png("い"), "image/png")})
    assert predicted.json()["model_version"] == "8" and predicted.headers["x-model-version"] == "8"
    assert predicted.headers["x-bento-model"] == new_tag


def test_a_corrupt_model_leaves_the_old_one_serving_and_says_why(swappable: dict[str, Any]) -> None:
    client, work = swappable["client"], swappable["work"]
    before = client.get("/version").json()
    corrupt = work / "corrupt"
    corrupt.mkdir()
    for name in ("classmap.csv", "meta.json"):
        shutil.copyfile(work / name, corrupt / name)
    (corrupt / "model.onnx").write_bytes((work / "model.onnx").read_bytes()[:1000])
    store_bundle(corrupt, "9", swappable["env"])
    answer = _reload(swappable)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["code"] == "model_rejected"
    assert "not a loadable ONNX model" in error["message"] and "still serving" in error["message"]
    assert error["served"] == before["bento_model"]
    time.sleep(3 * FOLLOW_S)  # the other worker would have followed by now, had the marker moved
    assert client.get("/version").json() == before
    assert set(_served_versions(swappable)) == {before["registry_version"]}
    predicted = client.post("/predict", files={"image": ("a.png", bad_inputs.scan_png("う"), "image/png")})
    assert predicted.status_code == 200 and predicted.headers["x-model-version"] == before["registry_version"]


def test_polling_the_store_picks_up_a_new_champion_with_no_call(tmp_path: Path) -> None:
    with serve_tiny_model(tmp_path, {"reload_poll_s": 0.3}, workers=1) as served:  # no admin token: no endpoint
        client = served["client"]
        assert client.post("/admin/reload", headers={"Authorization": "Bearer x"}).status_code == 404
        new_tag = store_bundle(served["work"], "8", served["env"])
        deadline = time.monotonic() + 20
        while client.get("/version").json()["bento_model"] != new_tag and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.get("/version").json()["registry_version"] == "8"
        reloads = [line for line in client.get("/metrics").text.splitlines()
                   if line.startswith("kuzushiji_model_reloads_total{")]
        assert any('trigger="poll"' in line and 'outcome="swapped"' in line for line in reloads), reloads
