"""Token auth, the same for every front end (WebSocket endpoints, the file API, the page's JSON)."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from urllib.parse import parse_qs


def token_ok(tokens: tuple[str, ...], headers: Mapping[str, str], query: str) -> bool:
    """A configured token in the kyutai-api-key header, a Bearer token, or ?token= / ?auth_id=.
    Always true when no token is configured.

    Args:
        tokens: the `auth_tokens` setting.
        headers: the request's headers (case-insensitive mapping).
        query: the URL's query string.
    """
    if not tokens:
        return True
    offered = [headers.get("kyutai-api-key", "")]
    bearer = headers.get("Authorization", "")
    if bearer.lower().startswith("bearer "):
        offered.append(bearer[7:].strip())
    params = parse_qs(query)
    offered += params.get("token", []) + params.get("auth_id", [])
    return any(hmac.compare_digest(o.encode(), t.encode()) for o in offered if o for t in tokens)
