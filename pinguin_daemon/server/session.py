"""One streaming session, whatever the wire it came in on.

Every front end (the WebSocket paths, the file API, Wyoming) drives this object in process: audio
in (re-framed to 80 ms, handed to the engine with flow control), flushes, markers, and the
engine's events back out to the front end's `Listener`. Admission, idle timeouts, draining and
the summary log line are the `Gateway`'s (gateway.py). A session knows no wire format.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..audio.pcm import Reframer
from ..engine.events import Event, SessionClosed, Word
from ..model.loader import FRAME_SAMPLES, SAMPLE_RATE

if TYPE_CHECKING:
    from ..engine.loop import Engine
    from .metrics import Metrics

# Frames handed to the engine and not yet stepped, per session. Past this `feed` waits, so a
# client sending faster than real time is slowed down (by TCP, on a socket), never dropped.
MAX_FRAMES_IN_FLIGHT = 4
# Silence frames fed after the last audio beyond the model's delay: one for the input lag of one
# step, one for margin.
FLUSH_EXTRA_FRAMES = 2
# Latency samples kept per session for its summary line (~2.2 hours of frames).
MAX_LATENCY_SAMPLES = 100_000
# Markers (Kyutai's protocol) waiting for their audio to be transcribed, per session.
MAX_MARKERS = 1000


@dataclass(frozen=True, slots=True)
class Ending:
    """How a session ended, in WebSocket close-code terms whatever the front end (the metrics and
    the summary line count every front end alike)."""

    code: int  # close code (server/codes.py): 1000 done, 1001 draining, 1008 idle, ...
    reason: str  # one line, for the client and the log
    error: str | None = None  # machine-readable error code, for protocols that send one


class Listener(Protocol):
    """What a front end implements to hear from its session (called on the event loop)."""

    def on_step(self, events: list[Event], step: int, buffered: int) -> bool:
        """One engine step of the session (`step` counts them from 1; `buffered`: samples
        waiting for a whole frame). True when output for the client was queued: its latency is
        measured when the front end reports it sent (`Session.output_sent`)."""
        ...

    def on_marker(self, marker_id: int) -> None:
        """Every frame of the audio before the marker, plus the model's delay, is transcribed."""
        ...


class Session:
    """State of one streaming session; lives on the event loop."""

    def __init__(self, session_id: str, frontend: str, peer: str, engine: Engine, delay_steps: int,
                 listener: Listener, metrics: Metrics | None = None) -> None:
        """Args:
            session_id: unique id, also the engine's key for the slot.
            frontend: the front end's name for logs and metrics ("/ws", "wyoming", "files", ...).
            peer: the client's address as the front end saw it.
            engine: the inference engine (slots).
            delay_steps: the model's text delay in steps (flushes feed that much silence).
            listener: the front end that receives the session's events.
            metrics: the daemon's metrics, if any.
        """
        self.id = session_id
        self.frontend = frontend
        self.peer = peer
        self.engine = engine
        self.listener = listener
        self.metrics = metrics
        self.flush_frames = delay_steps + FLUSH_EXTRA_FRAMES
        self.delay_steps = delay_steps
        self.loop = asyncio.get_running_loop()
        self.reframer = Reframer()
        self.submitted = 0  # frames handed to the engine
        self.stepped = 0  # frames the engine has consumed
        self.advanced = asyncio.Event()  # set whenever the engine steps this session
        self.released = False  # the slot went back to the engine
        self.task: asyncio.Task[Any] | None = None  # the front end's task (cancelled by a cut)
        # A front end's way to close its client at once (a cut: engine failure, deadline).
        self.closer: Any = None
        # (step that answers it, marker id), in order: answered from the left, O(1) each.
        self.markers: deque[tuple[int, int]] = deque()
        self.last_heard = time.monotonic()  # last time the client sent anything (idle timeout)
        self.busy = 0  # server-side work in progress (a flush): the idle clock does not run
        self.interrupted = asyncio.Event()  # the daemon asks the session to end (drain, idle)
        self.interruption: Ending | None = None  # why
        self.ending: Ending | None = None  # how it ended, for the summary line
        # Server-added latency: per submitted frame, when the message completing it arrived
        # (None for silence the server made up in a flush); per step with queued output, its arrival.
        self._arrivals: deque[float | None] = deque()
        self._stamps: list[float] = []
        self.latencies: list[float] = []  # seconds, one per stepped audio frame (capped)
        self.words = 0  # words decoded, for the summary
        self.max_lag = 0  # most frames in flight seen
        self.lag_sum = 0  # frames in flight summed over submits, for the mean
        self.started = time.monotonic()
        self.extra: dict[str, Any] = {}  # the front end's own figures for the summary line
        # Silence the server fed into the model (flushes): (model sample where it begins, samples),
        # so that model times map back to the client's own audio timeline.
        self.injections: list[tuple[int, int]] = []

    # ---- engine thread -> loop ----------------------------------------------------------------
    def sink(self, events: list[Event]) -> None:
        """Engine sink: called on the engine thread; hops to the event loop."""
        self.loop.call_soon_threadsafe(self._deliver, events)

    def _deliver(self, events: list[Event]) -> None:
        if self.released or (events and isinstance(events[-1], SessionClosed)):
            return  # (steps in flight when the session ended: its client has had its last words)
        self.stepped += 1
        self.advanced.set()
        self.words += sum(1 for e in events if isinstance(e, Word))
        arrived = self._arrivals.popleft() if self._arrivals else None
        queued = self.listener.on_step(events, self.stepped, self.reframer.buffered)
        self._answer_markers()
        if arrived is not None:
            if queued:
                self._stamps.append(arrived)  # measured when the output leaves
            else:
                self._record_latency(time.perf_counter() - arrived)

    def _record_latency(self, seconds: float) -> None:
        if len(self.latencies) < MAX_LATENCY_SAMPLES:
            self.latencies.append(seconds)
        if self.metrics is not None:
            self.metrics.server_latency.observe(seconds)

    def output_sent(self) -> None:
        """The front end wrote the queued output to its client: latencies end here."""
        if not self._stamps:
            return
        now = time.perf_counter()
        for arrived in self._stamps:
            self._record_latency(now - arrived)
        self._stamps.clear()

    # ---- front end -> session -----------------------------------------------------------------
    def heard(self) -> None:
        """The client sent something (audio or a message): the idle clock starts again."""
        self.last_heard = time.monotonic()

    def idle_for(self, now: float) -> float:
        """Seconds since the client last sent anything (0 while the session works for it)."""
        return 0.0 if self.busy else now - self.last_heard

    def interrupt(self, ending: Ending) -> None:
        """Ask the front end to end the session (the first reason wins)."""
        if self.interruption is None:
            self.interruption = ending
        self.interrupted.set()

    @property
    def samples_in(self) -> int:
        """Samples of 24 kHz audio taken in so far."""
        return self.reframer.samples_in

    async def feed(self, samples: np.ndarray, arrived: float | None = None) -> None:
        """Take audio (float32 mono 24 kHz, any length): whole frames go to the engine, waiting
        while MAX_FRAMES_IN_FLIGHT are not yet stepped.

        Args:
            samples: the audio.
            arrived: when the client message carrying it arrived (perf_counter), for latency.
        """
        await self._submit(self.reframer.push(samples), arrived)

    async def _submit(self, frames: np.ndarray, arrived: float | None = None) -> None:
        for row in frames:
            while self.submitted - self.stepped >= MAX_FRAMES_IN_FLIGHT and not self.released:
                self.advanced.clear()
                await self.advanced.wait()
            if self.released:
                return  # the session ended meanwhile: nothing more reaches the engine
            self._arrivals.append(arrived)
            self.engine.submit(self.id, row)
            self.submitted += 1
            lag = self.submitted - self.stepped
            self.max_lag = max(self.max_lag, lag)
            self.lag_sum += lag
            if self.metrics is not None:
                self.metrics.audio_frames.inc()
                self.metrics.frames_in_flight.observe(lag)

    async def flush(self, tail: np.ndarray | None = None) -> None:
        """Finish the words already spoken without ending the stream: the partial frame, then the
        model's delay of silence (faster than real time); returns once every frame is stepped
        (its events delivered to the listener).

        Args:
            tail: audio the front end held back (a resampler's last samples), fed first.
        """
        self.busy += 1
        try:
            if tail is not None and len(tail):
                await self.feed(tail, time.perf_counter())
            silence = np.zeros((self.flush_frames, FRAME_SAMPLES), np.float32)
            buffered = self.reframer.buffered
            padding = (FRAME_SAMPLES - buffered) % FRAME_SAMPLES
            self.injections.append((self.submitted * FRAME_SAMPLES + buffered, padding + silence.size))
            await self._submit(np.concatenate([self.reframer.flush(), silence]))
            while self.stepped < self.submitted and not self.released:
                self.advanced.clear()
                await self.advanced.wait()
        finally:
            self.busy -= 1
            self.heard()

    def client_seconds(self, model_seconds: float) -> float:
        """A time of the model's audio as a time of the client's: the silence flushes fed is not
        the client's (a time inside such silence is where it began)."""
        position = model_seconds * SAMPLE_RATE
        shift = 0.0
        for start, count in self.injections:
            if position <= start:
                break
            shift += min(count, position - start)
        return (position - shift) / SAMPLE_RATE

    def mark(self, marker_id: int) -> bool:
        """Answer `marker_id` (Listener.on_marker) once the audio taken so far is transcribed;
        False when MAX_MARKERS are already waiting (the caller ends the session)."""
        if len(self.markers) >= MAX_MARKERS:
            return False
        frames = -(-self.reframer.samples_in // FRAME_SAMPLES)
        self.markers.append((frames + self.delay_steps, marker_id))
        self._answer_markers()
        return True

    def _answer_markers(self) -> None:
        while self.markers and self.markers[0][0] <= self.stepped:
            self.listener.on_marker(self.markers.popleft()[1])

    def release(self) -> None:
        """Give the slot back now (the engine drops it before its next step). Idempotent."""
        if self.released:
            return
        self.released = True
        self.advanced.set()  # a feed or flush waiting for the engine returns
        self.engine.close_session(self.id, "session ended")

    def summary(self) -> dict[str, Any]:
        lat = np.array(self.latencies) * 1000
        third = len(lat) // 3
        latency: dict[str, Any] = {}
        if len(lat):
            latency = {"latency_p50_ms": round(float(np.percentile(lat, 50)), 1),
                       "latency_p99_ms": round(float(np.percentile(lat, 99)), 1),
                       "latency_max_ms": round(float(lat.max()), 1)}
        if third:
            # Lag growth: a session that falls behind real time shows a rising latency.
            latency["latency_growth_ms"] = round(float(lat[-third:].mean() - lat[:third].mean()), 1)
        return {
            "endpoint": self.frontend,
            "duration_s": round(time.monotonic() - self.started, 2),
            "audio_s": round(self.reframer.samples_in / SAMPLE_RATE, 2),
            "samples": self.reframer.samples_in,
            "frames": self.submitted,
            "words": self.words,
            "mean_lag_frames": round(self.lag_sum / self.submitted, 2) if self.submitted else 0.0,
            "max_lag_frames": self.max_lag,
            **self.extra,
            **latency,
        }
