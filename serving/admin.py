"""``POST /admin/reload``: swap in the store's champion without a restart, for whoever holds the token in
$KUZUSHIJI_ADMIN_TOKEN (off, 404, while it is unset); the token is compared in constant time."""

from __future__ import annotations

import hmac
import logging
import os

from starlette.responses import JSONResponse, Response

from serving.errors import RequestRejected
from serving.model_holder import ModelHolder, ModelRejected

log = logging.getLogger("kuzushiji.service")
ADMIN_TOKEN_ENV = "KUZUSHIJI_ADMIN_TOKEN"
MIN_TOKEN_CHARS = 16


def admin_token() -> str | None:
    """The admin token of this server, or None (the admin endpoints off)."""
    token = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
    if token and len(token) < MIN_TOKEN_CHARS:
        log.warning("$%s is only %d characters long: use %d or more random ones", ADMIN_TOKEN_ENV, len(token),
                    MIN_TOKEN_CHARS)
    return token or None


def check_token(authorization: str | None, token: str | None) -> RequestRejected | None:
    """None when ``authorization`` (the header) carries ``token``; else the rejection to answer."""
    if token is None:
        return RequestRejected(404, "not_found", f"the admin endpoints are off: set ${ADMIN_TOKEN_ENV} on the "
                                                 "server to turn them on")
    scheme, _, given = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return RequestRejected(401, "unauthorized", "send the admin token as 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(given.strip().encode("utf-8", "replace"), token.encode("utf-8")):
        return RequestRejected(403, "forbidden", "wrong admin token")
    return None


async def reload(authorization: str | None, token: str | None, holder: ModelHolder) -> Response:
    """The answer to ``POST /admin/reload``: 200 with the model now served, or why the old one still serves."""
    refused = check_token(authorization, token)
    if refused is not None:
        response = refused.response()
        if refused.status == 401:
            response.headers["www-authenticate"] = 'Bearer realm="kuzushiji-admin"'
        return response
    try:
        answer = await holder.reload()
    except ModelRejected as exc:
        served = holder.current
        log.error("reload refused: %s; still serving %s", exc, served.tag)
        return RequestRejected(422, "model_rejected", f"{exc}; still serving {served.tag} (version "
                                                      f"{served.version})", served=served.tag).response()
    answer["other_workers_follow_within_s"] = holder.follow_s
    return JSONResponse(answer, headers=holder.current.headers)
