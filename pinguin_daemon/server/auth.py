"""Who may use the daemon: tokens (the same for every front end that can carry one) and web
origins (browsers)."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from urllib.parse import parse_qs, urlsplit

# Browsers cannot set headers on a WebSocket: OpenAI's browser clients send the key as a
# subprotocol named with this prefix (and ask for the "realtime" subprotocol).
SUBPROTOCOL_KEY_PREFIX = "openai-insecure-api-key."


def _as_bytes(text: str) -> bytes | None:
    """A header value as bytes for a constant-time comparison; None when it cannot be a token
    (bytes no text encoding gives: a client's garbage is a wrong token, never a crash)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return None


def offered_tokens(headers: Mapping[str, str], query: str) -> list[str]:
    """Every token a request offers: the kyutai-api-key header, a Bearer token, ?token= or
    ?auth_id=, or a browser's `openai-insecure-api-key.<token>` subprotocol."""
    offered = [headers.get("kyutai-api-key", "")]
    bearer = headers.get("Authorization", "")
    if bearer[:7].lower() == "bearer ":
        offered.append(bearer[7:].strip())
    params = parse_qs(query, errors="replace")
    offered += params.get("token", []) + params.get("auth_id", [])
    for protocol in headers.get("Sec-WebSocket-Protocol", "").split(","):
        protocol = protocol.strip()
        if protocol.startswith(SUBPROTOCOL_KEY_PREFIX):
            offered.append(protocol[len(SUBPROTOCOL_KEY_PREFIX):])
    return [o for o in offered if o]


def token_ok(tokens: tuple[str, ...], headers: Mapping[str, str], query: str) -> bool:
    """A configured token is offered (see offered_tokens). Always true when none is configured.

    Args:
        tokens: the `auth_tokens` setting.
        headers: the request's headers (case-insensitive mapping).
        query: the URL's query string.
    """
    if not tokens:
        return True
    wanted = [t.encode() for t in tokens]
    for offer in offered_tokens(headers, query):
        data = _as_bytes(offer)
        if data is not None and any(hmac.compare_digest(data, t) for t in wanted):
            return True
    return False


def matching_token(tokens: tuple[str, ...], headers: Mapping[str, str], query: str) -> str | None:
    """The configured token a request offers (None without one): a session remembers it, so that
    only the same token resumes it."""
    wanted = {t.encode(): t for t in tokens}
    for offer in offered_tokens(headers, query):
        data = _as_bytes(offer)
        for raw, token in wanted.items():
            if data is not None and hmac.compare_digest(data, raw):
                return token
    return None


def _origin_key(scheme: str, netloc: str) -> str:
    """host:port, with the scheme's default port made explicit."""
    netloc = netloc.lower()
    if ":" not in netloc.rsplit("]", 1)[-1]:
        netloc += ":443" if scheme in ("https", "wss") else ":80"
    return netloc


def origin_allowed(headers: Mapping[str, str], allowed: tuple[str, ...]) -> bool:
    """A browser's WebSocket may connect: it sends no Origin (apps, SDKs, Home Assistant), or its
    Origin is the daemon's own page (same host and port as the request), or it is listed in
    `allowed_origins` ("*": any).

    Args:
        headers: the handshake's headers.
        allowed: the `allowed_origins` setting.
    """
    origin = headers.get("Origin")
    if origin is None:
        return True
    if "*" in allowed or origin in allowed:
        return True
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    host = headers.get("Host", "")
    if not parts.netloc or not host:
        return False
    return _origin_key(parts.scheme, parts.netloc) in (_origin_key("http", host), _origin_key("https", host))
