"""The original design, kept as a benchmark baseline: a plain FastAPI app, an async endpoint, eager
PyTorch called per request (no batching, inference on the event loop), Pillow resize to 28x28.

Run: ``KUZUSHIJI_BASELINE_WEIGHTS=state.pt KUZUSHIJI_BASELINE_CLASSES=49 uvicorn
benchmarks.fastapi_baseline:app --host 127.0.0.1 --port 8000``. Serves the same SpinalVGG weights as
the BentoML service's ONNX file (benchmarks/load.py exports both from one model).
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from fastapi import FastAPI, File, UploadFile
from PIL import Image

from pipeline.contract import GLYPH_SIDE
from pipeline.model import SpinalVGG

WEIGHTS_ENV, CLASSES_ENV, THREADS_ENV = (
    "KUZUSHIJI_BASELINE_WEIGHTS",
    "KUZUSHIJI_BASELINE_CLASSES",
    "KUZUSHIJI_BASELINE_THREADS",
)

torch.set_num_threads(int(os.environ.get(THREADS_ENV, "2")))
model = SpinalVGG(int(os.environ[CLASSES_ENV]))
model.load_state_dict(torch.load(os.environ[WEIGHTS_ENV], map_location="cpu", weights_only=True))
model.eval()
app = FastAPI(title="baseline")


@app.post("/predict")
async def predict(image: UploadFile = File(...), top_k: int = 5) -> dict:  # noqa: B008  # FastAPI's idiom
    gray = Image.open(io.BytesIO(await image.read())).convert("L").resize((GLYPH_SIDE, GLYPH_SIDE))
    x = torch.from_numpy(np.asarray(gray, dtype=np.float32))[None, None]
    with torch.no_grad():
        probabilities = torch.softmax(model(x), dim=1)[0]
    values, indices = probabilities.topk(top_k)
    return {
        "predictions": [
            {"index": int(i), "probability": float(v)} for v, i in zip(values, indices, strict=True)
        ]
    }
