"""The response shapes, for the OpenAPI page and BentoML clients (responses are built as plain dicts)."""

from __future__ import annotations

from pydantic import BaseModel, Field

TOP_K_DOC = "number of classes returned per image (1..number of classes; default serve.top_k)"
CONFIDENT_DOC = ("true when the calibrated top probability reaches the threshold chosen on validation for "
                 "evaluate.answered_accuracy (99.5% by default) on the answered images; false = not sure, "
                 "read the top guesses; null for a model trained before calibration")
IN_DOMAIN_DOC = ("false when the image does not look like any of the kana the model knows (its in-domain "
                 "score is under the threshold set on validation); the top guesses stay in 'predictions'; "
                 "null for a model trained before calibration")
REASON_DOC = "why the image is not in the domain (present only when in_domain is false)"


class ClassScore(BaseModel):
    index: int = Field(description="class index in the model's class map", examples=[0])
    char: str = Field(description="the hiragana character", examples=["あ"])
    codepoint: str = Field(description="its Unicode code point", examples=["U+3042"])
    reading: str | None = Field(description="its modern reading in romaji (null outside the K49 kana)",
                                examples=["a"])
    probability: float = Field(description="calibrated softmax probability", ge=0.0, le=1.0, examples=[0.93])


class Verdict(BaseModel):
    confident: bool | None = Field(description=CONFIDENT_DOC, examples=[True])
    in_domain: bool | None = Field(description=IN_DOMAIN_DOC, examples=[True])
    reason: str | None = Field(None, description=REASON_DOC, examples=[None])


class Prediction(Verdict):
    model_version: str = Field(description="MLflow registry version of the served model", examples=["3"])
    predictions: list[ClassScore] = Field(description="top-k classes, most probable first")


class ImageResult(Verdict):
    filename: str | None = Field(description="the uploaded file's name (multipart) or null", examples=["a.png"])
    predictions: list[ClassScore]


class BatchPrediction(BaseModel):
    model_version: str = Field(examples=["3"])
    results: list[ImageResult] = Field(description="one entry per image, in the order sent")
