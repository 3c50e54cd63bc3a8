"""One /ws connection: socket -> frames -> Mimi -> engine, and engine events -> socket.

The seed's protocol: binary messages of raw little-endian float32 24 kHz mono samples, any
length; text messages back, each a piece of transcript the client appends as is. An empty
binary message (which the seed's client never sends) means "end of audio": the daemon flushes
the model's delay, sends the last words, and closes with 1000.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from ..audio.encoder import EncoderPool
from ..audio.pcm import BadAudio, Reframer, decode_f32le
from ..engine.events import Event, SessionClosed, TextPiece
from ..engine.loop import Engine
from ..logs import get_logger
from ..model.loader import FRAME_SAMPLES, SAMPLE_RATE
from .protocol import Close

# Frames handed to the engine and not yet stepped, per session. Past this the session stops
# reading its socket, so a client sending faster than real time is slowed by TCP, not dropped.
MAX_FRAMES_IN_FLIGHT = 4
# Transcript text not yet written to a client that does not read; past it the session is closed.
MAX_UNSENT_TEXT_BYTES = 64 * 1024
# Silence frames fed after the last audio beyond the model's delay: one for the input lag of one
# step, one for margin.
FLUSH_EXTRA_FRAMES = 2

log = get_logger("session")


class Session:
    """State and tasks of one streaming connection. Lives on the event loop."""

    def __init__(self, ws: ServerConnection, session_id: str, engine: Engine, encoders: EncoderPool,
                 delay_steps: int, stopping: asyncio.Event) -> None:
        self.ws = ws
        self.id = session_id
        self.engine = engine
        self.encoders = encoders
        self.flush_frames = delay_steps + FLUSH_EXTRA_FRAMES
        self.stopping = stopping  # set when the daemon shuts down
        self.loop = asyncio.get_running_loop()
        self.reframer = Reframer()
        self.encoder: Any = None  # this session's streaming Mimi state
        self.submitted = 0  # frames handed to the engine
        self.stepped = 0  # frames the engine has consumed
        self.advanced = asyncio.Event()  # set whenever the engine steps this session
        self.engine_released = asyncio.Event()  # the engine freed the slot
        self.unsent: list[str] = []  # text pieces waiting for the socket (merged when sent)
        self.unsent_bytes = 0
        self.text_ready = asyncio.Event()  # unsent text is waiting
        self.too_slow = asyncio.Event()  # unsent text passed its bound: the client is not reading
        self._encoding: asyncio.Future[np.ndarray] | None = None  # the encode running in a worker
        self.sent_chars = 0
        self.max_lag = 0  # most frames in flight seen
        self.started = time.monotonic()
        self.log = log.bind(session_id=session_id)

    # ---- engine thread -> loop ----------------------------------------------------------------
    def sink(self, events: list[Event]) -> None:
        """Engine sink: called on the engine thread; hops to the event loop."""
        self.loop.call_soon_threadsafe(self._deliver, events)

    def _deliver(self, events: list[Event]) -> None:
        if events and isinstance(events[-1], SessionClosed):
            self.engine_released.set()
            return
        self.stepped += 1
        self.advanced.set()
        for event in events:
            if isinstance(event, TextPiece):
                self.unsent.append(event.text)
                self.unsent_bytes += len(event.text.encode())
        if self.unsent:
            self.text_ready.set()
        if self.unsent_bytes > MAX_UNSENT_TEXT_BYTES:
            self.too_slow.set()

    # ---- loop ---------------------------------------------------------------------------------
    async def run(self) -> tuple[int, str]:
        """Serve the connection until it ends; returns the close code and reason."""
        self.encoder = await self.encoders.acquire()
        sender = asyncio.create_task(self._send_loop())
        try:
            code, reason = await self._receive_loop()
        finally:
            sender.cancel()
        if code == Close.POLICY:
            self.log.warning("client_not_reading", unsent_bytes=self.unsent_bytes)
        try:
            await self.ws.close(code, reason)
        except ConnectionClosed:
            pass
        return code, reason

    async def _receive_loop(self) -> tuple[int, str]:
        stop_wait = asyncio.ensure_future(self.stopping.wait())
        slow_wait = asyncio.ensure_future(self.too_slow.wait())
        try:
            while True:
                recv = asyncio.ensure_future(self.ws.recv())
                done, _ = await asyncio.wait({recv, stop_wait, slow_wait},
                                             return_when=asyncio.FIRST_COMPLETED)
                if slow_wait in done:
                    recv.cancel()
                    return Close.POLICY, (f"client is not reading: over {MAX_UNSENT_TEXT_BYTES} "
                                          "bytes of transcript unread")
                if recv in done:
                    try:
                        message = recv.result()
                    except ConnectionClosed as exc:
                        rcvd = exc.rcvd
                        return (rcvd.code, rcvd.reason) if rcvd else (1006, "connection lost")
                    if isinstance(message, str):
                        return Close.UNSUPPORTED, ("text messages are not accepted on /ws: send audio "
                                                   "as binary float32 little-endian 24 kHz mono samples")
                    if not message:
                        await self.finish()
                        return Close.NORMAL, "end of audio: transcript complete"
                    try:
                        samples = decode_f32le(message)
                    except BadAudio as exc:
                        return Close.BAD_PAYLOAD, str(exc)
                    await self._submit(self.reframer.push(samples))
                else:
                    recv.cancel()
                # Checked after a received message is handled: what arrived is transcribed.
                if self.stopping.is_set():
                    await self.finish()
                    # Say exactly how much audio the transcript covers, so the client can resend the rest.
                    return Close.GOING_AWAY, (f"server shutting down; transcribed the first "
                                              f"{self.reframer.samples_in} samples")
        finally:
            stop_wait.cancel()
            slow_wait.cancel()

    async def _submit(self, frames: np.ndarray) -> None:
        """Encode whole frames in this session's order and hand them to the engine."""
        if not len(frames):
            return
        self._encoding = asyncio.ensure_future(self.encoders.encode(self.encoder, frames))
        codes = await asyncio.shield(self._encoding)  # a cancelled session still waits in release()
        for row in codes:
            while self.submitted - self.stepped >= MAX_FRAMES_IN_FLIGHT:
                self.advanced.clear()
                await self.advanced.wait()
            self.engine.submit(self.id, row)
            self.submitted += 1
            self.max_lag = max(self.max_lag, self.submitted - self.stepped)

    async def finish(self) -> None:
        """End of audio: encode the partial frame, feed the model's delay of silence, wait for
        every frame to be stepped and every piece of text to be sent."""
        tail = self.reframer.flush()
        silence = np.zeros((self.flush_frames, FRAME_SAMPLES), np.float32)
        await self._submit(np.concatenate([tail, silence]))
        while self.stepped < self.submitted:
            self.advanced.clear()
            await self.advanced.wait()
        await self._send_pending()

    async def _send_pending(self) -> None:
        if not self.unsent:
            return
        text = "".join(self.unsent)  # a slow reader gets pieces merged, never dropped
        self.unsent.clear()
        self.unsent_bytes = 0
        self.text_ready.clear()
        await self.ws.send(text)
        self.sent_chars += len(text)

    async def _send_loop(self) -> None:
        """Writes text as it comes; while a send waits on a slow client, pieces pile up and are
        merged into the next message."""
        while True:
            await self.text_ready.wait()
            try:
                await self._send_pending()
            except ConnectionClosed:
                return  # the receive side reports the close

    async def release(self) -> None:
        """Free the slot and the encoder: the engine drops the slot before its next step."""
        self.engine.close_session(self.id, "session ended")
        if self._encoding is not None and not self._encoding.done():
            await asyncio.wait([self._encoding])  # never hand out an encoder still in use
        if self.encoder is not None:
            self.encoders.release(self.encoder)
            self.encoder = None

    def summary(self) -> dict[str, Any]:
        return {
            "duration_s": round(time.monotonic() - self.started, 2),
            "audio_s": round(self.reframer.samples_in / SAMPLE_RATE, 2),
            "frames": self.submitted,
            "text_chars": self.sent_chars,
            "max_lag_frames": self.max_lag,
        }
