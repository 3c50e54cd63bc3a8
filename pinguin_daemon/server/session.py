"""One streaming connection: socket -> frames -> Mimi -> engine, and engine events -> socket.

The session does the I/O and the flow control; its `Protocol` (protocols.py) says what the
messages mean for its endpoint.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from ..audio.encoder import EncoderPool
from ..audio.pcm import Reframer
from ..engine.events import Event, SessionClosed, Word
from ..engine.loop import Engine
from ..logs import get_logger
from ..model.loader import FRAME_SAMPLES, SAMPLE_RATE
from .codes import Close
from .metrics import Metrics
from .protocols import AudioIn, FinishIn, FlushIn, MarkerIn, Protocol, Reject, Reply, clip_reason

# Frames handed to the engine and not yet stepped, per session. Past this the session stops
# reading its socket, so a client sending faster than real time is slowed by TCP, not dropped.
MAX_FRAMES_IN_FLIGHT = 4
# Output waiting for a client (the outbox plus websockets' write buffer, i.e. what the kernel did
# not take): past this bound, with nothing drained for UNREAD_GRACE_S, the client is not reading
# and is closed with 1008. A client that reads, however large one message, is never closed.
MAX_UNREAD_BYTES = 64 * 1024
UNREAD_GRACE_S = 2.0
# How often the reader watchdog looks at the write buffer.
READER_CHECK_S = 0.1
# Silence frames fed after the last audio beyond the model's delay: one for the input lag of one
# step, one for margin.
FLUSH_EXTRA_FRAMES = 2
# Latency samples kept per session for its summary line (~2.2 hours of frames).
MAX_LATENCY_SAMPLES = 100_000

log = get_logger("session")


class Session:
    """State and tasks of one streaming connection. Lives on the event loop."""

    def __init__(self, ws: ServerConnection, session_id: str, engine: Engine, encoders: EncoderPool | None,
                 protocol: Protocol, stopping: asyncio.Event, metrics: Metrics | None = None) -> None:
        self.ws = ws
        self.id = session_id
        self.engine = engine
        self.encoders = encoders
        self.protocol = protocol
        self.flush_frames = protocol.info.delay_steps + FLUSH_EXTRA_FRAMES
        self.stopping = stopping  # set when the daemon shuts down
        self.metrics = metrics
        self.loop = asyncio.get_running_loop()
        self.reframer = Reframer()
        self.encoder: Any = None  # this session's streaming Mimi state
        self.submitted = 0  # frames handed to the engine
        self.stepped = 0  # frames the engine has consumed
        self.advanced = asyncio.Event()  # set whenever the engine steps this session
        self.outbox: list[Any] = []  # protocol items waiting for the socket
        self.unsent_bytes = 0  # size of what waits in the outbox (the serialized items, roughly)
        self.bytes_sent = 0  # payload bytes handed to websockets (the watchdog sees them drain)
        self.outbox_ready = asyncio.Event()
        self.released = False  # the slot (and encoder) went back
        self.markers: list[tuple[int, int]] = []  # (step that answers it, marker id), in order
        # Server-added latency: per submitted frame, when the message completing it arrived
        # (None for silence the server made up in a flush); per queued output, that step's arrival.
        self._arrivals: deque[float | None] = deque()
        self._stamps: list[float] = []
        self.latencies: list[float] = []  # seconds, one per stepped audio frame (capped)
        self._encoding: asyncio.Future[np.ndarray] | None = None  # the encode running in a worker
        self.sent_messages = 0
        self.words = 0  # words decoded (all endpoints), for the summary
        self.max_lag = 0  # most frames in flight seen
        self.lag_sum = 0  # frames in flight summed over submits, for the mean
        self.started = time.monotonic()
        self.log = log.bind(session_id=session_id)

    # ---- engine thread -> loop ----------------------------------------------------------------
    def sink(self, events: list[Event]) -> None:
        """Engine sink: called on the engine thread; hops to the event loop."""
        self.loop.call_soon_threadsafe(self._deliver, events)

    def _deliver(self, events: list[Event]) -> None:
        if events and isinstance(events[-1], SessionClosed):
            return
        self.stepped += 1
        self.advanced.set()
        self.words += sum(1 for e in events if isinstance(e, Word))
        arrived = self._arrivals.popleft() if self._arrivals else None
        items = self.protocol.render(events, self.stepped, self.reframer.buffered)
        self._queue(items)
        self._deliver_markers_now()
        if arrived is not None:
            if items:
                self._stamps.append(arrived)  # measured when the output leaves
            else:
                self._record_latency(time.perf_counter() - arrived)

    def _record_latency(self, seconds: float) -> None:
        if len(self.latencies) < MAX_LATENCY_SAMPLES:
            self.latencies.append(seconds)
        if self.metrics is not None:
            self.metrics.server_latency.observe(seconds)

    def _queue(self, items: list[Any]) -> None:
        if not items:
            return
        self.outbox.extend(items)
        self.unsent_bytes += sum(len(str(i)) for i in items)
        self.outbox_ready.set()

    # ---- loop ---------------------------------------------------------------------------------
    async def run(self) -> tuple[int, str]:
        """Serve the connection until it ends; returns the close code and reason.

        Three things end a session, whichever comes first: the receive side (end of audio, a bad
        message, the daemon draining), the socket going away (the client left: its slot is
        released at once, whatever the session was waiting for), or the watchdog finding that the
        client has stopped reading (1008)."""
        self._queue(self.protocol.opening())
        sender = asyncio.create_task(self._send_loop())
        try:
            code, reason = await self._serve()
        finally:
            sender.cancel()  # also when the daemon cancels the session
        try:
            await self.ws.close(code, clip_reason(reason))
        except ConnectionClosed:
            pass
        return code, reason

    async def _serve(self) -> tuple[int, str]:
        """Run until the session ends, free the slot, send the protocol's closing messages."""
        receiver = asyncio.create_task(self._receive_loop())
        watchdog = asyncio.create_task(self._watch_reader())
        gone = asyncio.create_task(self.ws.wait_closed())
        tasks = (receiver, watchdog, gone)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        error: str | None = None
        if receiver.done() and not receiver.cancelled() and receiver.exception() is None:
            code, reason, error = receiver.result()
        elif watchdog.done() and not watchdog.cancelled():
            code, reason = Close.POLICY, (f"client is not reading: over {MAX_UNREAD_BYTES} bytes of "
                                          f"output unread for {UNREAD_GRACE_S:g} s")
            self.log.warning("client_not_reading", unsent_bytes=self.unsent_bytes + self._write_buffer())
        elif gone.done() and not gone.cancelled():
            code, reason = self.ws.close_code or 1006, self.ws.close_reason or "connection lost"
        else:
            receiver.result()  # the receive side failed: the handler logs it and closes with 1011
            raise AssertionError("unreachable")
        self.release()  # the slot is free before the closing handshake, however long that takes
        if code != Close.POLICY and code < 4000 and code not in (1005, 1006):
            try:  # error / closing messages of the protocol, then the close frame
                self.outbox.extend(self.protocol.closing(code, reason, error))
                await asyncio.wait_for(self._send_pending(), timeout=5)
            except (ConnectionClosed, TimeoutError):
                pass
        return code, reason

    async def _receive_loop(self) -> tuple[int, str, str | None]:
        if self.encoders is not None:  # a worker-pool encoder for this session (rustymimi)
            self.encoder = await self.encoders.acquire()
        stop_wait = asyncio.ensure_future(self.stopping.wait())
        recv: asyncio.Future[str | bytes] | None = None
        try:
            while True:
                recv = asyncio.ensure_future(self.ws.recv())
                done, _ = await asyncio.wait({recv, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                if recv in done:
                    try:
                        message = recv.result()
                    except ConnectionClosed as exc:
                        rcvd = exc.rcvd
                        return (rcvd.code, rcvd.reason, None) if rcvd else (1006, "connection lost", None)
                    if self.metrics is not None:
                        self.metrics.messages_in.inc()
                    ended = await self._handle(message, time.perf_counter())
                    if ended is not None:
                        return ended
                else:
                    recv.cancel()
                # Checked after a received message is handled: what arrived is transcribed.
                if self.stopping.is_set():
                    await self.flush()
                    # Say exactly how much audio the transcript covers, so the client can resend the rest.
                    return (Close.GOING_AWAY, f"server shutting down; transcribed the first "
                            f"{self.reframer.samples_in} samples", None)
        finally:
            stop_wait.cancel()
            if recv is not None:
                if not recv.done():
                    recv.cancel()  # the session is cancelled (the client left, or the daemon cuts it)
                elif not recv.cancelled():
                    recv.exception()  # retrieved: a close that raced the cancellation is expected

    def _write_buffer(self) -> int:
        """Bytes websockets has written to the transport that the kernel has not taken yet."""
        transport = getattr(self.ws, "transport", None)
        return int(transport.get_write_buffer_size()) if transport is not None else 0

    async def _watch_reader(self) -> None:
        """Returns when the client has stopped reading: more than MAX_UNREAD_BYTES wait for it
        (outbox + write buffer) and none of it has drained for UNREAD_GRACE_S."""
        calm = time.monotonic()  # last time the output was under the bound or drained
        drained_most = 0
        while True:
            await asyncio.sleep(READER_CHECK_S)
            buffered = self._write_buffer()
            drained = self.bytes_sent - buffered
            now = time.monotonic()
            if self.unsent_bytes + buffered <= MAX_UNREAD_BYTES or drained > drained_most:
                calm = now
            drained_most = max(drained_most, drained)
            if now - calm >= UNREAD_GRACE_S:
                return

    async def _handle(self, message: str | bytes, arrived: float) -> tuple[int, str, str | None] | None:
        """Apply one client message (arrived at `arrived`, perf_counter); a (code, reason, error)
        when the session must end."""
        for command in self.protocol.commands(message):
            if isinstance(command, AudioIn):
                await self._submit(self.reframer.push(command.samples), arrived)
            elif isinstance(command, FlushIn):
                await self.flush()
                self._queue(self.protocol.flushed(command.id))
            elif isinstance(command, FinishIn):
                await self.flush()
                return Close.NORMAL, "end of audio: transcript complete", None
            elif isinstance(command, MarkerIn):
                # Answered once every frame of the audio before it, plus the delay, is stepped.
                frames = -(-self.reframer.samples_in // FRAME_SAMPLES)
                self.markers.append((frames + self.protocol.info.delay_steps, command.id))
                self._deliver_markers_now()
            elif isinstance(command, Reply):
                self._queue(command.items)
            elif isinstance(command, Reject):
                return command.code, command.reason, command.error
        return None

    def _deliver_markers_now(self) -> None:
        while self.markers and self.markers[0][0] <= self.stepped:
            self._queue(self.protocol.marker(self.markers.pop(0)[1]))

    async def _submit(self, frames: np.ndarray, arrived: float | None = None) -> None:
        """Encode whole frames in this session's order and hand them to the engine.

        Args:
            frames: (n, 1920) samples.
            arrived: when the client message completing them arrived (None: server-made silence).
        """
        if not len(frames):
            return
        rows = frames  # the engine encodes them in its batch (mlx encoder)
        if self.encoders is not None:  # encoded here, on the worker pool (rustymimi)
            started = time.perf_counter()
            self._encoding = asyncio.ensure_future(self.encoders.encode(self.encoder, frames))
            # Shielded: a session cancelled mid-encode gives its encoder back when it ends (release).
            rows = await asyncio.shield(self._encoding)
            if self.metrics is not None:
                self.metrics.encoder_seconds.observe(time.perf_counter() - started)
        for row in rows:
            while self.submitted - self.stepped >= MAX_FRAMES_IN_FLIGHT:
                self.advanced.clear()
                await self.advanced.wait()
            self._arrivals.append(arrived)
            self.engine.submit(self.id, row)
            self.submitted += 1
            lag = self.submitted - self.stepped
            self.max_lag = max(self.max_lag, lag)
            self.lag_sum += lag
            if self.metrics is not None:
                self.metrics.audio_frames.inc()
                self.metrics.frames_in_flight.observe(lag)

    async def flush(self) -> None:
        """Finish the words already spoken without ending the stream: encode the partial frame,
        feed the model's delay of silence (faster than real time), wait until every frame is
        stepped and its text sent."""
        await self._submit(self.reframer.push(self.protocol.drain()), time.perf_counter())
        tail = self.reframer.flush()
        silence = np.zeros((self.flush_frames, FRAME_SAMPLES), np.float32)
        await self._submit(np.concatenate([tail, silence]))
        while self.stepped < self.submitted:
            self.advanced.clear()
            await self.advanced.wait()
        await self._send_pending()

    async def _send_pending(self) -> None:
        if not self.outbox:
            return
        items = self.outbox[:]  # a slow reader gets text merged, never dropped
        stamps = self._stamps[:]
        self.outbox.clear()
        self._stamps.clear()
        self.unsent_bytes = 0
        self.outbox_ready.clear()
        for message in self.protocol.wire(items):
            self.bytes_sent += len(message)
            await self.ws.send(message)
            self.sent_messages += 1
            if self.metrics is not None:
                self.metrics.messages_out.inc()
        now = time.perf_counter()
        for arrived in stamps:
            self._record_latency(now - arrived)

    async def _send_loop(self) -> None:
        """Writes output as it comes; while a send waits on a slow client, items pile up and
        text is merged into the next message."""
        while True:
            await self.outbox_ready.wait()
            try:
                await self._send_pending()
            except ConnectionClosed:
                return  # the receive side reports the close

    def release(self) -> None:
        """Give the slot back now (the engine drops it before its next step) and the encoder as
        soon as no encode uses it. Idempotent: called when the session ends and again by the
        handler, whatever path it took."""
        if self.released:
            return
        self.released = True
        self.engine.close_session(self.id, "session ended")
        encoder, self.encoder = self.encoder, None
        if encoder is None or self.encoders is None:
            return
        encoders = self.encoders
        if self._encoding is not None and not self._encoding.done():
            # Never drop an encoder a worker still uses: give it back when the encode ends.
            def give_back(done: asyncio.Future[np.ndarray]) -> None:
                if not done.cancelled():
                    done.exception()  # retrieved: nobody waits for this encode any more
                encoders.release(encoder)

            self._encoding.add_done_callback(give_back)
        else:
            encoders.release(encoder)

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
            "endpoint": self.protocol.path,
            "duration_s": round(time.monotonic() - self.started, 2),
            "audio_s": round(self.reframer.samples_in / SAMPLE_RATE, 2),
            "samples": self.reframer.samples_in,
            "frames": self.submitted,
            "words": self.words,
            "messages_out": self.sent_messages,
            "mean_lag_frames": round(self.lag_sum / self.submitted, 2) if self.submitted else 0.0,
            "max_lag_frames": self.max_lag,
            **latency,
        }
