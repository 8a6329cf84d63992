"""Which stored model the service serves: a pinned tag, else the one this checkout's package stage
recorded (the BentoML store is shared by every checkout on a machine), else the store's latest."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def served_tag(pinned: str | None, recorded: str | None, model_name: str) -> tuple[str, str]:
    """(tag, why): ``pinned`` ($KUZUSHIJI_BENTO_MODEL), ``recorded`` when the store holds it, else latest."""
    if pinned:
        return pinned, "pinned by $KUZUSHIJI_BENTO_MODEL"
    if recorded and _stored(recorded):
        return recorded, "recorded by this checkout's package stage (reports/bento_model.json)"
    if recorded:
        log.warning("%s (reports/bento_model.json) is not in this BentoML store; serving %s:latest",
                    recorded, model_name)
    return f"{model_name}:latest", "the BentoML store's latest"


def _stored(tag: str) -> bool:
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        bentoml.models.get(tag)
    except (NotFound, ValueError):
        return False
    return True
