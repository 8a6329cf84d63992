"""Whether a retrain is worth running: accepted feedback new since the champion's data, against
``feedback.min_new``. The store says what is accepted now, the champion's training run what it used."""

from __future__ import annotations

from typing import Any

from pipeline import tracking
from pipeline.config import Settings
from pipeline.feedback_store import accepted_items, new_since


def retrain_decision(settings: Settings, min_new: int | None = None) -> dict[str, Any]:
    """``{"retrain": bool, "why": str, "new": n, ...}``; no champion yet counts every accepted item as new."""
    needed = settings.feedback.min_new if min_new is None else min_new
    accepted = accepted_items(settings.feedback, settings.root)
    champion = tracking.champion_feedback(settings)
    used_items, used_max_id = (champion["items"], champion["max_id"]) if champion else (0, 0)
    new = new_since(accepted, used_items, used_max_id)
    model = (f"the champion (v{champion['version']}, trained with {used_items} feedback items)" if champion
             else f"any model ({settings.registered_model_name()} has no champion yet)")
    enough = new >= needed
    why = (f"{new} accepted feedback items ({settings.feedback.accept}) are new since {model}; "
           f"feedback.min_new is {needed}: " + ("retraining" if enough else "not retraining, too few"))
    return {"retrain": enough, "why": why, "new": new, "accepted": len(accepted), "min_new": needed,
            "champion_version": champion["version"] if champion else None}
