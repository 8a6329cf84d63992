"""The served model's "confident" / "in_domain" verdicts, from the thresholds in its meta.json (fitted on
validation by the train stage, pipeline/trust); the ONNX graph's logits are already calibrated."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.contract import Trust

log = logging.getLogger(__name__)
UNKNOWN = {"confident": None, "in_domain": None}  # a model trained before calibration: no thresholds


def load_trust(meta_path: Path) -> Trust | None:
    """The thresholds of a stored model's meta.json; None (with a warning) for a model without them."""
    try:
        meta = json.loads(Path(meta_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s unreadable (%s): answers carry no confident/in_domain verdicts", meta_path, exc)
        return None
    trust = Trust.from_meta(meta) if isinstance(meta, dict) else None
    if trust is None:
        log.warning("%s has no calibration thresholds (a model trained before them): confident and "
                    "in_domain are null; re-run train to get them", meta_path)
    return trust


def verdicts(trust: Trust | None, logits: np.ndarray) -> list[dict[str, Any]]:
    """One verdict per row of calibrated logits, in order."""
    if trust is None:
        return [dict(UNKNOWN) for _ in range(len(logits))]
    return trust.judge(logits)
