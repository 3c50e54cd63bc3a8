"""Prometheus metrics, served at GET /metrics. One registry per daemon (no process globals)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Engine steps kept for the status page's percentiles (80 s at 12.5 steps/s).
RECENT_STEPS = 1000


class Metrics:
    """Every metric of the daemon. Thread-safe (the engine thread observes steps)."""

    def __init__(self, free_slots: Callable[[], float]) -> None:
        """Args:
            free_slots: reads the number of free slots at scrape time.
        """
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions_open = Gauge("pinguin_sessions_open", "Sessions streaming now", registry=r)
        self.free_slots = Gauge("pinguin_free_slots", "Batch slots free for new sessions", registry=r)
        self.free_slots.set_function(free_slots)
        self.sessions_opened = Counter("pinguin_sessions_opened", "Sessions admitted", ["endpoint"],
                                       registry=r)
        self.sessions_refused = Counter("pinguin_sessions_refused", "Sessions refused (1013: full)",
                                        registry=r)
        self.sessions_closed = Counter("pinguin_sessions_closed", "Sessions ended, by close code",
                                       ["code"], registry=r)
        self.step_seconds = Histogram(
            "pinguin_engine_step_seconds", "Duration of one batched engine step", registry=r,
            buckets=(0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.0))
        self.active_slots = Histogram("pinguin_engine_active_slots", "Slots stepped per engine step",
                                      registry=r, buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
        self.frames_in_flight = Histogram(
            "pinguin_frames_in_flight", "Frames of a session queued for the engine (lag), at each submit",
            registry=r, buckets=(1, 2, 3, 4, 8))
        self.server_latency = Histogram(
            "pinguin_server_added_latency_seconds",
            "From the arrival of the message completing an audio frame to its step's output leaving",
            registry=r, buckets=(0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08,
                                 0.1, 0.12, 0.16, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0))
        self.audio_frames = Counter("pinguin_audio_frames", "80 ms frames handed to the engine",
                                    registry=r)
        self.messages_in = Counter("pinguin_messages_in", "WebSocket messages received", registry=r)
        self.messages_out = Counter("pinguin_messages_out", "WebSocket messages sent", registry=r)
        self.sessions_waiting = Gauge("pinguin_sessions_waiting_for_resume",
                                      "/v2 sessions whose connection dropped, waiting to be resumed",
                                      registry=r)
        self.sessions_resumed = Counter("pinguin_sessions_resumed", "/v2 sessions resumed after a drop",
                                        registry=r)
        self.sessions_expired = Counter("pinguin_sessions_resume_expired",
                                        "/v2 sessions not resumed within resume_grace", registry=r)
        self.model_load_seconds = Gauge("pinguin_model_load_seconds",
                                        "Time to load and warm the model", registry=r)

        # The last steps' durations, for the status page's percentiles (deque appends are atomic).
        self.recent_steps: deque[float] = deque(maxlen=RECENT_STEPS)

    def observe_step(self, seconds: float, rows: int) -> None:
        self.step_seconds.observe(seconds)
        self.active_slots.observe(rows)
        self.recent_steps.append(seconds)

    def step_percentiles_ms(self) -> dict[str, float | None]:
        """p50 and p99 of the last RECENT_STEPS engine steps, in ms (None before any step)."""
        import numpy as np

        steps = np.array(self.recent_steps)
        if not len(steps):
            return {"p50": None, "p99": None}
        return {"p50": round(float(np.percentile(steps, 50)) * 1000, 1),
                "p99": round(float(np.percentile(steps, 99)) * 1000, 1)}

    def render(self) -> bytes:
        return generate_latest(self.registry)
