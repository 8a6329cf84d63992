"""A model swapped while serving (serving/model_holder.py, serving/admin.py), on real ONNX Runtime sessions of
models stored in a real BentoML store: requests queued before a swap finish on the old session, every answer
names the model that computed it, a bad model leaves the old one serving, and the admin token is checked."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.config import Settings
from pipeline.contract import ONNX_INPUT, ONNX_OUTPUT, ClassMap, write_classmap
from pipeline.stages.package import store_model
from serving import admin
from serving.model_holder import ModelHolder, ModelRejected, ServedModel, load_model

CHARS = "あいうえおかきくけこ"
TOKEN = "a-long-enough-admin-token-0123456789"


def linear_onnx(path: Path, classes: int, winner: int, side: int = 28, output: str = ONNX_OUTPUT) -> Path:
    """A real ONNX graph, logits = flatten(images) @ 0 + bias, whose answer is always class ``winner``."""
    bias = np.zeros(classes, dtype=np.float32)
    bias[winner] = 5.0
    weights = numpy_helper.from_array(np.zeros((side * side, classes), dtype=np.float32), "weights")
    graph = helper.make_graph(
        [helper.make_node("Flatten", [ONNX_INPUT], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "weights"], ["scores"]),
         helper.make_node("Add", ["scores", "bias"], [output])],
        "linear",
        [helper.make_tensor_value_info(ONNX_INPUT, TensorProto.FLOAT, ["N", 1, side, side])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", classes])],
        initializer=[weights, numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def store(make_settings: Callable[..., Settings], bento_store: Path, tmp_path: Path) -> Callable[..., str]:
    """Store a model (a version label, the class it always answers, how it is broken) in the BentoML store."""
    settings = make_settings()

    def _store(version: str, winner: int = 0, *, classes: int = len(CHARS), map_classes: int | None = None,
               side: int = 28, output: str = ONNX_OUTPUT, corrupt: bool = False) -> str:
        folder = tmp_path / f"bundle-{version}"
        folder.mkdir()
        onnx_path = linear_onnx(folder / "model.onnx", classes, winner, side, output)
        if corrupt:
            onnx_path.write_bytes(onnx_path.read_bytes()[:200])
        write_classmap(ClassMap.from_chars(CHARS[: map_classes or classes]), folder / "classmap.csv")
        (folder / "meta.json").write_text(json.dumps({"dataset": "synthetic", "run_id": version}), encoding="utf-8")
        return store_model(settings, onnx_path=onnx_path, classmap_path=folder / "classmap.csv",
                           meta_path=folder / "meta.json", registry_version=version, metrics={})

    return _store


def _load(tag: str) -> ServedModel:
    return load_model(tag, source="test", threads=1, max_batch=8)


def _holder(tag: str, marker: Path | None = None, poll_s: float = 0.0) -> ModelHolder:
    name = tag.split(":")[0]
    return ModelHolder(_load(tag), _load, lambda: f"{name}:latest", marker=marker, follow_s=0.05, poll_s=poll_s)


async def _classify(holder: ModelHolder) -> tuple[str, int]:
    """One request: (the version the answer names, the class the computing session chose)."""
    async with holder.serving() as served:
        probabilities = await served.batcher.run(np.zeros((1, 28, 28), dtype=np.uint8))
    return served.version, int(probabilities[0].argmax())


def test_a_reload_swaps_between_batches_and_every_answer_names_the_model_that_computed_it(store) -> None:
    first = store("1", winner=0)

    async def scenario() -> tuple[list[tuple[str, int]], dict[str, Any], ServedModel]:
        holder = _holder(first)
        old = holder.current
        before = [asyncio.create_task(_classify(holder)) for _ in range(40)]  # queued on the old batcher
        await asyncio.sleep(0)
        store("2", winner=1)
        answer = await holder.reload()
        after = [asyncio.create_task(_classify(holder)) for _ in range(40)]
        results = await asyncio.gather(*before, *after)
        return list(results), answer, old

    results, answer, old = asyncio.run(scenario())
    assert answer["swapped"] and answer["model"]["registry_version"] == "2"
    assert answer["previous"]["registry_version"] == "1"
    assert len(results) == 80  # none dropped
    assert all((version, winner) in {("1", 0), ("2", 1)} for version, winner in results), results
    assert results[:40] == [("1", 0)] * 40  # admitted before the swap: answered by the old session
    assert results[40:] == [("2", 1)] * 40
    assert old.retired and old.active == 0


def test_reloading_the_served_model_changes_nothing(store) -> None:
    holder = _holder(store("1"))
    answer = asyncio.run(holder.reload())
    assert answer["swapped"] is False and answer["model"]["registry_version"] == "1"


@pytest.mark.parametrize(("broken", "why"), [
    ({"corrupt": True}, "not a loadable ONNX model"),
    ({"side": 32}, "input has shape"),
    ({"classes": 10, "map_classes": 5}, "class map has 5 classes"),
    ({"output": "scores_out"}, "no output 'logits'"),
    ({"classes": 5}, "needs a new deployment"),
])
def test_a_bad_model_leaves_the_old_one_serving_and_says_why(store, broken: dict[str, Any], why: str) -> None:
    holder = _holder(store("1", winner=0))

    async def scenario() -> tuple[str, tuple[str, int]]:
        store("2", winner=1, **broken)
        with pytest.raises(ModelRejected) as rejected:
            await holder.reload()
        return str(rejected.value), await _classify(holder)

    message, answered = asyncio.run(scenario())
    assert why in message and ":" in message, message
    assert answered == ("1", 0)
    assert holder.current.version == "1"


def test_the_other_workers_follow_the_marker_a_reload_bumps(store, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    first = store("1", winner=0)

    async def scenario() -> list[str]:
        leader, follower, watching = _holder(first, marker), _holder(first, marker), _holder(first, marker)
        await follower.follow()  # no marker yet: nothing to follow
        watching.start()  # looks every follow_s by itself, as in a worker
        seen = [follower.current.version]
        store("2", winner=1)
        await leader.reload()
        await follower.follow()
        seen.append(follower.current.version)
        seen.append((await _classify(follower))[0])
        late = _holder(first, marker)  # a worker started after the reload catches up at its first look
        await late.follow()
        seen.append(late.current.version)
        for _ in range(100):
            if watching.current.version == "2":
                break
            await asyncio.sleep(0.05)
        watching.stop()
        seen.append(watching.current.version)
        return seen

    assert asyncio.run(scenario()) == ["1", "2", "2", "2", "2"]


def test_polling_the_store_swaps_when_on_and_tries_a_bad_model_once(store) -> None:
    first = store("1", winner=0)

    async def scenario() -> list[str]:
        off, on = _holder(first), _holder(first, poll_s=0.01)
        store("2", winner=1, corrupt=True)
        await asyncio.sleep(0.02)
        await on.follow()
        seen = [on.current.version]
        store("3", winner=1)
        await asyncio.sleep(0.02)
        await asyncio.gather(off.follow(), on.follow())
        return [*seen, on.current.version, off.current.version]

    assert asyncio.run(scenario()) == ["1", "3", "1"]


def _refusal(authorization: str | None, token: str | None) -> int | None:
    refused = admin.check_token(authorization, token)
    return refused.status if refused is not None else None


def test_the_admin_token_is_required_and_checked() -> None:
    assert _refusal("Bearer x", None) == 404  # off
    assert _refusal(None, TOKEN) == 401
    assert _refusal("Basic dXNlcjpwdw==", TOKEN) == 401
    assert _refusal("Bearer ", TOKEN) == 401
    assert _refusal(f"Bearer {TOKEN}x", TOKEN) == 403
    assert _refusal(TOKEN[:-1], TOKEN) == 401  # no scheme
    assert _refusal("Bearer \u00e4", TOKEN) == 403  # not ASCII
    assert _refusal(f"Bearer {TOKEN}", TOKEN) is None
    assert _refusal(f"bearer  {TOKEN} ", TOKEN) is None


def test_the_reload_endpoint_answers_the_swap_or_why_not(store) -> None:
    first = store("1", winner=0)
    holder = _holder(first)

    async def scenario() -> list[Any]:
        refused = await admin.reload("Bearer wrong", TOKEN, holder)
        store("2", winner=1, side=32)
        bad = await admin.reload(f"Bearer {TOKEN}", TOKEN, holder)
        store("3", winner=1)
        good = await admin.reload(f"Bearer {TOKEN}", TOKEN, holder)
        return [refused, bad, good]

    refused, bad, good = asyncio.run(scenario())
    assert refused.status_code == 403
    assert bad.status_code == 422
    error = json.loads(bad.body)["error"]
    assert error["code"] == "model_rejected" and "input has shape" in error["message"]
    assert "still serving" in error["message"] and error["served"] == first
    assert good.status_code == 200 and good.headers["x-model-version"] == "3"
    assert json.loads(good.body)["model"]["registry_version"] == "3"
