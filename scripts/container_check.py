"""Helpers of ``scripts/container_smoke.sh``: derive a bentofile with another base image, and check a
running container's answers against the same model run here with ONNX Runtime.

    python scripts/container_check.py bentofile --base-image IMAGE --out DERIVED.yaml [--src bentofile.yaml]
    python scripts/container_check.py check --url http://127.0.0.1:PORT --model TAG [--top-k K]

``check`` renders K49 characters with the bundled Japanese font (dark ink on a light, larger canvas, as a
user would send), posts them to ``/predict`` and ``/predict_batch`` and verifies: HTTP 200, the JSON
shape, the model version, ``top_k`` entries in descending probability that match the class map, and the
probabilities of the host's own ONNX Runtime run of the model (same bytes, same preprocessing); and that the
page at ``/`` (with its files and ``/glyph``) and the OpenAPI page at ``/docs`` are served. It prints
one JSON summary line and exits non-zero with the reason on the first mismatch.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.config import PROJECT_ROOT

BENTOFILE = PROJECT_ROOT / "bentofile.yaml"
VERSION_LABEL = "registry_version"  # pipeline.stages.package.LABEL_REGISTRY_VERSION
# Container and host run the same ONNX graph on the same glyph; only float reassociation may differ.
PROB_ATOL = 1e-4
UPSCALE = 4  # request images are 4x the glyph side, so the service's crop/resize path does real work
BATCH_IMAGES = 3
RENDER_SEED = 0
HTTP_TIMEOUT_S = 60.0


class CheckFailed(AssertionError):
    """The container answered, but not what the model says it should."""


def derive_bentofile(src: Path, base_image: str, out: Path) -> Path:
    """Write a copy of ``src`` whose ``docker.base_image`` is ``base_image`` (the original stays as is)."""
    if not src.is_file():
        raise SystemExit(f"{src}: no bentofile; run from the project root (it holds bentofile.yaml)")
    config = yaml.safe_load(src.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise SystemExit(f"{src}: expected a mapping (BentoML build options)")
    docker = config.get("docker") or {}
    config["docker"] = {**docker, "base_image": base_image}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return out


def request_images(chars: list[str]) -> list[bytes]:
    """PNG files of ``chars``: a K49-style rendering, inverted to dark ink on white and upscaled."""
    from PIL import Image

    from pipeline.synthetic import render_glyph

    rng = np.random.default_rng(RENDER_SEED)
    files = []
    for char in chars:
        glyph = 255 - render_glyph(char, rng)  # dataset glyphs are white on black; paper is light
        side = glyph.shape[0] * UPSCALE
        buffer = io.BytesIO()
        Image.fromarray(glyph).resize((side, side), Image.Resampling.BICUBIC).save(buffer, format="PNG")
        files.append(buffer.getvalue())
    return files


class HostModel:
    """The stored BentoML model, run here: what the container must answer."""

    def __init__(self, tag: str) -> None:
        import bentoml

        from pipeline.config import load_settings
        from pipeline.contract import CLASSMAP_FILE, ONNX_FILE, load_classmap, onnx_session
        from pipeline.imaging import ImageLimits

        try:
            model = bentoml.models.get(tag)
        except bentoml.exceptions.NotFound:
            raise SystemExit(f"BentoML model {tag!r} is not in the store (BENTOML_HOME): nothing to check "
                             "against") from None
        self.tag = str(model.tag)
        self.version = str(model.info.labels.get(VERSION_LABEL, model.tag.version))
        classmap = load_classmap(Path(model.path_of(CLASSMAP_FILE)))
        self.classes = list(zip(classmap.codepoints, classmap.chars, strict=True))
        self.session = onnx_session(model.path_of(ONNX_FILE))
        serve = load_settings().serve
        self.limits = ImageLimits(max_bytes=serve.max_upload_bytes, max_pixels=serve.max_pixels)

    def probabilities(self, data: bytes) -> np.ndarray:
        from pipeline.contract import ONNX_INPUT, ONNX_OUTPUT, softmax
        from pipeline.imaging import load_glyph

        images = load_glyph(data, self.limits).astype(np.float32)[None, None]
        (logits,) = self.session.run([ONNX_OUTPUT], {ONNX_INPUT: images})
        return softmax(logits)[0]


def check_predictions(where: str, got: Any, expected: np.ndarray, model: HostModel, top_k: int) -> None:
    """``got`` is the top-k list the container returned for an image whose probabilities are ``expected``."""
    if not isinstance(got, list) or len(got) != top_k:
        raise CheckFailed(f"{where}: expected a list of {top_k} predictions, got {got!r}")
    previous = float("inf")
    for rank, entry in enumerate(got):
        if not isinstance(entry, dict) or set(entry) != {"index", "char", "codepoint", "reading", "probability"}:
            raise CheckFailed(f"{where}[{rank}]: expected index/char/codepoint/reading/probability, got {entry!r}")
        index, probability = entry["index"], entry["probability"]
        if not (isinstance(index, int) and 0 <= index < len(model.classes)):
            raise CheckFailed(f"{where}[{rank}]: class index {index!r} outside 0..{len(model.classes) - 1}")
        if (entry["codepoint"], entry["char"]) != model.classes[index]:
            raise CheckFailed(f"{where}[{rank}]: class {index} is {model.classes[index]}, got "
                              f"{(entry['codepoint'], entry['char'])}")
        if probability > previous + PROB_ATOL:
            raise CheckFailed(f"{where}: probabilities not in descending order at rank {rank}")
        if abs(probability - expected[index]) > PROB_ATOL:
            raise CheckFailed(f"{where}[{rank}]: probability of class {index} is {probability:.6f}, "
                              f"the model run here gives {expected[index]:.6f}")
        previous = probability
    # Top-k for real: no class left out is more probable than the least probable one returned.
    returned = {entry["index"] for entry in got}
    left_out = max((expected[i] for i in range(len(expected)) if i not in returned), default=0.0)
    if left_out > got[-1]["probability"] + PROB_ATOL:
        raise CheckFailed(f"{where}: a class outside the returned top-{top_k} has probability {left_out:.6f}")


def check(url: str, tag: str, top_k: int | None = None) -> dict[str, Any]:
    """Send one ``/predict`` and one ``/predict_batch`` request; verify both answers."""
    import httpx

    from pipeline.config import load_settings

    model = HostModel(tag)
    top_k = min(top_k or load_settings().serve.top_k, len(model.classes))
    chars = [char for _, char in model.classes[:BATCH_IMAGES]]
    files = request_images(chars)
    expected = [model.probabilities(data) for data in files]
    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S) as client:
        single = client.post("/predict", files={"image": ("glyph0.png", files[0], "image/png")},
                             data={"top_k": str(top_k)})
        _expect_ok("/predict", single, model)
        body = single.json()
        check_predictions("/predict predictions", body.get("predictions"), expected[0], model, top_k)

        names = [f"glyph{i}.png" for i in range(len(files))]
        batch = client.post("/predict_batch", data={"top_k": str(top_k)},
                            files=[("images", (name, data, "image/png"))
                                   for name, data in zip(names, files, strict=True)])
        _expect_ok("/predict_batch", batch, model)
        results = batch.json().get("results")
        if not isinstance(results, list) or [r.get("filename") for r in results] != names:
            raise CheckFailed(f"/predict_batch: expected results for {names} in order, got {results!r}")
        for i, (result, probabilities) in enumerate(zip(results, expected, strict=True)):
            where = f"/predict_batch results[{i}]"
            check_predictions(where, result.get("predictions"), probabilities, model, top_k)
        check_page(client, files[0])
    return {
        "model": model.tag,
        "model_version": model.version,
        "top_k": top_k,
        "chars": chars,
        "predict_top1": body["predictions"][0]["char"],
        "batch_top1": [result["predictions"][0]["char"] for result in results],
    }


# What the page's files must contain (page/), and the OpenAPI page moved to /docs.
PAGE_PARTS = (("/", 'id="pad"'), ("/page/page.js", "/predict_batch"), ("/page/page.css", "#pad"),
              ("/docs", "swagger-ui"))


def check_page(client: Any, image: bytes) -> None:
    """The page at / and its files are served, and /glyph turns ``image`` into a 28x28 PNG."""
    for path, part in PAGE_PARTS:
        response = client.get(path)
        if response.status_code != 200 or part not in response.text:
            raise CheckFailed(f"{path}: expected HTTP 200 containing {part!r}, got HTTP "
                              f"{response.status_code}: {response.text[:300]}")
    glyph = client.post("/glyph", files={"image": ("glyph.png", image, "image/png")})
    if glyph.status_code != 200 or glyph.headers.get("content-type") != "image/png":
        raise CheckFailed(f"/glyph: expected a PNG, got HTTP {glyph.status_code}: {glyph.text[:300]}")
    from PIL import Image

    from pipeline.contract import GLYPH_SIDE

    size = Image.open(io.BytesIO(glyph.content)).size
    if size != (GLYPH_SIDE, GLYPH_SIDE):
        raise CheckFailed(f"/glyph: expected a {GLYPH_SIDE}x{GLYPH_SIDE} glyph, got {size}")


def _expect_ok(endpoint: str, response: Any, model: HostModel) -> None:
    if response.status_code != 200:
        raise CheckFailed(f"{endpoint}: HTTP {response.status_code}: {response.text[:500]}")
    body = response.json()
    if body.get("model_version") != model.version:
        raise CheckFailed(f"{endpoint}: model_version {body.get('model_version')!r}, the stored model "
                          f"{model.tag} holds registry version {model.version!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="container_check.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    derive = commands.add_parser("bentofile", help="copy bentofile.yaml with docker.base_image set")
    derive.add_argument("--base-image", required=True)
    derive.add_argument("--out", type=Path, required=True)
    derive.add_argument("--src", type=Path, default=BENTOFILE)
    smoke = commands.add_parser("check", help="send predict/predict_batch and verify the answers")
    smoke.add_argument("--url", required=True, help="base URL of the running container")
    smoke.add_argument("--model", required=True, help="BentoML model tag the image was built with")
    smoke.add_argument("--top-k", type=int, default=None, help="default: serve.top_k of params.yaml")
    args = parser.parse_args(argv)
    if args.command == "bentofile":
        print(derive_bentofile(args.src, args.base_image, args.out))
        return 0
    try:
        summary = check(args.url.rstrip("/"), args.model, args.top_k)
    except CheckFailed as exc:
        print(f"container check FAILED: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
