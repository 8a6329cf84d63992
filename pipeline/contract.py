"""What crosses stage boundaries (file names, formats, ONNX IO names, run records, registry tags), in one
torch-free module: stages never import each other, and the service reads the same names."""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.files import write_json, write_text

if TYPE_CHECKING:  # onnxruntime is imported only when a session is made
    import onnxruntime as ort

# ------------------------------------------------------------------------------------------- images

GLYPH_SIDE = 28  # dataset fact: K49 and KMNIST images are 28x28, uint8, white ink (255) on black (0)

# ----------------------------------------------------------------------------------- the official format

NPZ_KEY = "arr_0"  # the one array of each official .npz
CLASSMAP_HEADER = ("index", "codepoint", "char")
CLASSMAP_SUFFIX = "_classmap.csv"  # {prefix}_classmap.csv
MIN_CLASSES = 2  # a classifier needs at least two classes


def official_file_names(prefix: str) -> dict[str, str]:
    """File names of the official format (K49, KMNIST, a local folder), by role."""
    return {
        "train_images": f"{prefix}-train-imgs.npz",
        "train_labels": f"{prefix}-train-labels.npz",
        "test_images": f"{prefix}-test-imgs.npz",
        "test_labels": f"{prefix}-test-labels.npz",
        "classmap": f"{prefix}{CLASSMAP_SUFFIX}",
    }


class DataError(RuntimeError):
    """Data is missing, unreachable or malformed; the message says what, where and what to do."""


@dataclass(frozen=True)
class ClassMap:
    """Class index -> Unicode code point ("U+3042") and character."""

    codepoints: tuple[str, ...]
    chars: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.chars)

    @classmethod
    def from_chars(cls, chars: str | tuple[str, ...]) -> ClassMap:
        return cls(tuple(f"U+{ord(char):04X}" for char in chars), tuple(chars))


def load_classmap(path: Path) -> ClassMap:
    """Read and validate an ``index,codepoint,char`` class map (UTF-8)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: class map not found (expected a CSV with header index,codepoint,char)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: class map is not UTF-8 text ({exc}); save it as UTF-8") from None
    return parse_classmap(text, source=str(path))


def parse_classmap(text: str, source: str = "class map") -> ClassMap:
    """Validate the text of an ``index,codepoint,char`` class map."""
    rows = [row for row in csv.reader(io.StringIO(text)) if row]
    if not rows or tuple(cell.strip() for cell in rows[0]) != CLASSMAP_HEADER:
        got = ",".join(rows[0]) if rows else "an empty file"
        raise DataError(
            f"{source}: bad class-map header {got!r}; the first line must be 'index,codepoint,char'"
        )
    codepoints: list[str] = []
    chars: list[str] = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(CLASSMAP_HEADER):
            raise DataError(f"{source}, line {line}: expected 3 fields index,codepoint,char, got {row!r}")
        index, codepoint, char = (cell.strip() for cell in row)
        if index != str(len(chars)):
            raise DataError(
                f"{source}, line {line}: class index {index!r} where {len(chars)} was expected; indices "
                "must be 0, 1, 2, ... in order, one row per class"
            )
        if not re.fullmatch(r"U\+[0-9A-Fa-f]{4,6}", codepoint):
            raise DataError(f"{source}, line {line}: codepoint {codepoint!r} is not of the form U+3042")
        value = int(codepoint.removeprefix("U+"), 16)
        if len(char) != 1 or ord(char) != value:
            raise DataError(
                f"{source}, line {line}: char {char!r} does not match codepoint {codepoint} ({chr(value)!r})"
            )
        codepoints.append(codepoint.upper())
        chars.append(char)
    if len(chars) < MIN_CLASSES:
        raise DataError(
            f"{source}: the class map declares {len(chars)} class(es); at least {MIN_CLASSES} needed"
        )
    if len(set(chars)) != len(chars):
        duplicates = sorted({char for char in chars if chars.count(char) > 1})
        raise DataError(
            f"{source}: the class map lists {duplicates} more than once; each class needs its own char"
        )
    return ClassMap(tuple(codepoints), tuple(chars))


def write_classmap(classmap: ClassMap, path: Path) -> Path:
    """Write the official CSV form (header, ``i,U+XXXX,c`` rows, UTF-8, LF), atomically."""
    lines = [",".join(CLASSMAP_HEADER)]
    rows = zip(classmap.codepoints, classmap.chars, strict=True)
    lines += [f"{index},{codepoint},{char}" for index, (codepoint, char) in enumerate(rows)]
    return write_text(path, "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------- the model bundle

# What the train stage writes next to each other, what MLflow logs as the ``onnx/`` artifact folder,
# what the BentoML model holds and what the service reads.
ONNX_FILE = "model.onnx"
CLASSMAP_FILE = "classmap.csv"
META_FILE = "meta.json"
MODEL_FILES = (ONNX_FILE, CLASSMAP_FILE, META_FILE)
# The ONNX graph's one input (float32 (N, 1, 28, 28), raw pixels 0..255; the model normalises) and
# one output (float32 (N, classes) logits).
ONNX_INPUT = "images"
ONNX_OUTPUT = "logits"


def onnx_session(path: Path | str, threads: int | None = None) -> ort.InferenceSession:
    """A CPU ONNX Runtime session for ``path``; ``threads`` = intra-op threads (None = runtime default).

    One sequential graph: parallelism comes from the intra-op threads, never from inter-op threads.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of float (N, classes) logits, stable for large values."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------------- the training run

TRAIN_RUN_FILE = "train_run.json"  # under paths.models: the MLflow run the train stage logged to


@dataclass(frozen=True)
class TrainRun:
    """Which MLflow run holds a trained model: written by train, read by evaluate and register."""

    run_id: str
    experiment_id: str
    tracking_uri: str

    def write(self, path: Path) -> Path:
        return write_json(path, asdict(self))

    @classmethod
    def read(cls, path: Path) -> TrainRun:
        path = Path(path)
        try:
            info: Any = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{path}: not found; run the train stage first (dvc repro train)") from None
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: unreadable ({exc}); re-run the train stage") from None
        if not isinstance(info, dict):
            raise DataError(f"{path}: expected a JSON object with run_id; re-run the train stage")
        run_id = info.get("run_id")
        if not isinstance(run_id, str) or not run_id:
            raise DataError(f"{path}: 'run_id' is missing or empty; re-run the train stage")
        return cls(run_id=run_id, experiment_id=str(info.get("experiment_id") or ""),
                   tracking_uri=str(info.get("tracking_uri") or ""))


# ------------------------------------------------------------------------ tuned values, trained bundle

BEST_PARAMS_FILE = "best_params.yaml"  # under paths.models: the tune stage's best values, dotted keys
BUNDLE_FILE = "model.pt"  # under paths.models: the trained weights + constructor arguments (PyTorch)


def read_best_params(path: Path) -> dict[str, Any]:
    """The tune stage's best values (dotted key -> value); {} when tuning was off or the file is absent."""
    import yaml

    path = Path(path)
    if not path.is_file():
        return {}
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not valid YAML ({exc}); delete it or re-run the tune stage") from None
    if not values:
        return {}
    if not isinstance(values, dict) or not all(isinstance(key, str) for key in values):
        raise DataError(f"{path}: expected a mapping of dotted setting -> value; re-run the tune stage")
    return values


# ------------------------------------------------------------------------------ the registry's record

# Tags of every registered model version: written by the register stage, read by the package stage.
HEADLINE_METRIC = "test_balanced_accuracy"  # K49's official metric; decides champion and quality gate
TEST_METRICS = ("test_balanced_accuracy", "test_accuracy", "test_macro_f1")
TAG_STATUS = "status"
STATUS_PENDING, STATUS_READY, STATUS_FAILED = "pending", "ready", "failed"


BENTO_MODEL_REPORT = "bento_model.json"  # under paths.reports: the BentoML tag the package stage stored


def recorded_bento_tag(reports_dir: Path) -> str | None:
    """The BentoML model tag this checkout's package stage recorded, or None before the first package."""
    path = Path(reports_dir) / BENTO_MODEL_REPORT
    try:
        tag = json.loads(path.read_text(encoding="utf-8")).get("tag")
    except (OSError, ValueError, AttributeError):
        return None
    return tag if isinstance(tag, str) and tag else None


# The collect stage's export of accepted feedback (under paths.feedback), read by prepare: the official
# layout ({prefix}-train-imgs.npz, {prefix}-train-labels.npz, {prefix}_classmap.csv) and a manifest.
FEEDBACK_PREFIX = "feedback"
FEEDBACK_MANIFEST = "manifest.json"  # accept mode, n_items, max_id, ids, per-class counts, file MD5s
# What a training run records of it (MLflow params), read back by the retrain deployment.
FEEDBACK_ITEMS_PARAM = "data.feedback_items"
FEEDBACK_MAX_ID_PARAM = "data.feedback_max_id"


# ------------------------------------------------------------------ trust: calibration and thresholds

# meta.json's "trust" object (written by train, read by evaluate and the service): the temperature already
# baked into the ONNX graph (its "logits" are calibrated), the top-probability threshold of "confident"
# and the in-domain score threshold under which an image is "not a kana".
TRUST_KEY = "trust"
REASON_BLANK = "the image is blank: no strokes to read"


@dataclass(frozen=True)
class Trust:
    temperature: float
    confidence_threshold: float
    ood_threshold: float

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Trust | None:
        """The thresholds of a model's meta.json; None for a model trained before calibration."""
        values = meta.get(TRUST_KEY)
        if not isinstance(values, dict):
            return None
        try:
            return cls(float(values["temperature"]), float(values["confidence_threshold"]),
                       float(values["ood_threshold"]))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"meta.json {TRUST_KEY!r} is malformed ({values!r}); re-run the train stage") from None

    def judge(self, logits: np.ndarray) -> list[dict[str, Any]]:
        """Per row of calibrated logits: ``confident``, ``in_domain`` and, when not, the ``reason``."""
        scores, top = in_domain_score(logits), softmax(logits).max(axis=1)
        verdicts: list[dict[str, Any]] = []
        for score, probability in zip(scores.tolist(), top.tolist(), strict=True):
            verdict: dict[str, Any] = {"confident": probability >= self.confidence_threshold,
                                       "in_domain": score >= self.ood_threshold}
            if not verdict["in_domain"]:
                verdict["confident"] = False
                verdict["reason"] = (f"its strokes do not look like any of the kana the model knows (in-domain "
                                     f"score {score:.2f}, below {self.ood_threshold:.2f})")
            verdicts.append(verdict)
        return verdicts


def in_domain_score(logits: np.ndarray) -> np.ndarray:
    """log-sum-exp of each row (minus the energy, Liu et al. 2020): low when no class fits the image."""
    values = np.asarray(logits, dtype=np.float64)
    peak = values.max(axis=1)
    return peak + np.log(np.exp(values - peak[:, None]).sum(axis=1))


# Modern readings (Hepburn romaji) of the K49 classes, keyed by character; KMNIST's ten are among them.
# ゐ, ゑ and を are read i, e and o today; ゝ repeats the kana before it.
READINGS: dict[str, str] = {
    "あ": "a", "い": "i", "う": "u", "え": "e", "お": "o", "か": "ka", "き": "ki", "く": "ku", "け": "ke", "こ": "ko",
    "さ": "sa", "し": "shi", "す": "su", "せ": "se", "そ": "so", "た": "ta", "ち": "chi", "つ": "tsu", "て": "te",
    "と": "to", "な": "na", "に": "ni", "ぬ": "nu", "ね": "ne", "の": "no", "は": "ha", "ひ": "hi", "ふ": "fu",
    "へ": "he", "ほ": "ho", "ま": "ma", "み": "mi", "む": "mu", "め": "me", "も": "mo", "や": "ya", "ゆ": "yu",
    "よ": "yo", "ら": "ra", "り": "ri", "る": "ru", "れ": "re", "ろ": "ro", "わ": "wa", "ゐ": "i (old wi)",
    "ゑ": "e (old we)", "を": "o (wo)", "ん": "n", "ゝ": "repeat mark",
}
