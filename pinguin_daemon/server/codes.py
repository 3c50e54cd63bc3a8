"""Close codes, in one table. Each has a test that a client sees it with its reason."""

from __future__ import annotations

from enum import IntEnum


class Close(IntEnum):
    NORMAL = 1000  # the stream ended (end-of-audio message) and every word was sent
    GOING_AWAY = 1001  # the daemon is shutting down; final text was sent first
    UNSUPPORTED = 1003  # a text message on /ws (audio must be binary)
    BAD_PAYLOAD = 1007  # binary message that is not float32 samples, or NaN/inf samples
    POLICY = 1008  # the client stopped reading its transcript (unread text past the bound)
    TOO_BIG = 1009  # a message over max_message_bytes (sent by websockets itself)
    INTERNAL = 1011  # the inference engine stopped; the daemon exits and launchd restarts it
    TRY_AGAIN = 1013  # every slot is taken: try again later
    # /v2 resumption (docs/PROTOCOL.md), in the range for applications.
    RESUME_UNKNOWN = 4001  # no session waits under that resume token (wrong, expired or finished)
    REPLACED = 4002  # a resumed connection took the session over from this one
    RESUME_TOO_LATE = 4003  # the events after last_seq are no longer kept: the session cannot resume


# The /ws stream path of the seed's iOS client.
WS_PATH = "/ws"
HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
METRICS_PATH = "/metrics"
PAGE_PATH = "/"  # the status page with a live transcript (pinguin_daemon/web/index.html)
STATUS_PATH = "/status"  # the JSON the page shows
