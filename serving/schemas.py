"""The response shapes, for the OpenAPI page and BentoML clients (responses are built as plain dicts)."""

from __future__ import annotations

from pydantic import BaseModel, Field

TOP_K_DOC = "number of classes returned per image (1..number of classes; default serve.top_k)"


class ClassScore(BaseModel):
    index: int = Field(description="class index in the model's class map", examples=[0])
    char: str = Field(description="the hiragana character", examples=["あ"])
    codepoint: str = Field(description="its Unicode code point", examples=["U+3042"])
    probability: float = Field(description="softmax probability", ge=0.0, le=1.0, examples=[0.93])


class Prediction(BaseModel):
    model_version: str = Field(description="MLflow registry version of the served model", examples=["3"])
    predictions: list[ClassScore] = Field(description="top-k classes, most probable first")


class ImageResult(BaseModel):
    filename: str | None = Field(description="the uploaded file's name (multipart) or null", examples=["a.png"])
    predictions: list[ClassScore]


class BatchPrediction(BaseModel):
    model_version: str = Field(examples=["3"])
    results: list[ImageResult] = Field(description="one entry per image, in the order sent")
