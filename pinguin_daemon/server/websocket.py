"""The WebSocket front end (/ws, /v2, /api/asr-streaming, /v1/realtime on the main port): the
socket's I/O, flow control towards the client and close codes. What the messages mean is the
path's wire protocol (protocols/); the stream itself is a gateway session like any other."""

from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Any

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from ..audio.vad import SpeechDetector
from ..engine.events import Event
from ..logs import get_logger
from .codes import Close
from .gateway import Gateway, Refused
from .metrics import Metrics
from .protocols import AudioIn, FinishIn, FlushIn, MarkerIn, Protocol, Reject, Reply, VadReset, clip_reason
from .session import MAX_MARKERS, Ending, Session

# Output waiting for a client (the outbox plus websockets' write buffer, i.e. what the kernel did
# not take): past this bound, with nothing drained for UNREAD_GRACE_S, the client is not reading
# and is closed with 1008. A client that reads, however large one message, is never closed.
MAX_UNREAD_BYTES = 64 * 1024
UNREAD_GRACE_S = 2.0
# Output waiting for a client, however slowly it drains: past this, it is closed with 1008 at
# once. Our own output never comes near it (text is merged, echoed strings are clipped); a client
# that sends requests for output faster than it reads the answers does.
MAX_OUTPUT_BYTES = 4 * 1024 * 1024
# How often the reader watchdog looks at the write buffer.
READER_CHECK_S = 0.1
# How long the protocol's closing messages may take to leave before the close frame goes anyway,
# and how long the close handshake may take before the connection is aborted.
CLOSING_SEND_S = 5.0
# A resumed connection waits this long for the previous one to let the session go.
TAKEOVER_S = 5.0

log = get_logger("websocket")


@cache
def vad_threads() -> ThreadPoolExecutor:
    """Where voice activity is computed: off the event loop, shared by every session (a
    session's audio goes through in order: it waits for each chunk's result)."""
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="vad")


async def close_within(ws: ServerConnection, code: int, reason: str, timeout: float = CLOSING_SEND_S) -> None:
    """Close with a close frame, or abort the connection when the handshake does not finish in
    `timeout` seconds (a client that does not read would otherwise hold it forever: websockets
    waits for the close frame to drain before its own close timeout starts)."""
    try:
        async with asyncio.timeout(timeout):
            await ws.close(code, clip_reason(reason))
    except ConnectionClosed:
        pass
    except TimeoutError:
        abort(ws)


def abort(ws: ServerConnection) -> None:
    transport = getattr(ws, "transport", None)
    if transport is not None:
        transport.abort()


def peer_of(ws: ServerConnection) -> str:
    address = ws.remote_address
    return str(address[0]) if address else ""


class WsStream:
    """One WebSocket connection's side of a session: its protocol, the outbox, the socket."""

    def __init__(self, ws: ServerConnection, protocol: Protocol, metrics: Metrics | None = None) -> None:
        self.ws = ws
        self.protocol = protocol
        self.metrics = metrics
        self.session: Session | None = None  # set by run()
        self.outbox: list[Any] = []  # protocol items waiting for the socket
        self.unsent_bytes = 0  # size of what waits in the outbox (the serialized items, roughly)
        self.bytes_sent = 0  # payload bytes handed to websockets (the watchdog sees them drain)
        self.outbox_ready = asyncio.Event()
        self.overflowed = asyncio.Event()  # more than MAX_OUTPUT_BYTES wait for the client
        self.not_reading = False  # the connection ended because the client stopped reading
        self.sent_messages = 0
        # Resuming (/v2): the session outlives a connection that ends without a close frame.
        self.resumable = False
        self.owner_token: str | None = None  # the auth token that opened it: only it resumes it
        self.replaced = asyncio.Event()  # a resumed connection takes over from this one
        self.released_connection = asyncio.Event()  # the connection runner has let go
        self.resume_lock = asyncio.Lock()  # one resumed connection takes over at a time
        self.taking_over = False  # a resumed connection waits for this one to let go
        self._handling: asyncio.Future[Ending | None] | None = None  # the command being applied
        self.detector: SpeechDetector | None = None  # voice activity, when the protocol wants it

    # ---- Listener (the session's events) -----------------------------------------------------
    def on_step(self, events: list[Event], step: int, buffered: int) -> bool:
        items = self.protocol.render(events, step, buffered)
        self._queue(items)
        return bool(items)

    def on_marker(self, marker_id: int) -> None:
        self._queue(self.protocol.marker(marker_id))

    def _queue(self, items: list[Any]) -> None:
        if not items:
            return
        self.outbox.extend(items)
        self.unsent_bytes += sum(len(str(i)) for i in items)
        self.outbox_ready.set()
        if self.unsent_bytes + self._write_buffer() > MAX_OUTPUT_BYTES:
            self.overflowed.set()

    # ---- the connection -----------------------------------------------------------------------
    async def run(self, session: Session) -> Ending:
        """Serve the connection until it ends; the slot is free on return (the caller closes the
        socket, after the session's bookkeeping).

        Three things end it, whichever comes first: the receive side (end of audio, a bad
        message, the daemon draining, the idle timeout), the socket going away (the client left:
        its slot is released at once, whatever the session was waiting for), or the watchdog
        finding that the client has stopped reading (1008)."""
        self.session = session
        self.protocol.clock = session.client_seconds
        if not self.outbox:
            self._queue(self.protocol.opening())
        self.replaced.clear()
        self.released_connection.clear()
        self.overflowed.clear()
        sender = asyncio.create_task(self._send_loop())
        try:
            ending = await self._serve(session)
        finally:
            sender.cancel()  # also when the daemon cancels the session
            self.released_connection.set()
        session.extra["messages_out"] = self.sent_messages
        return ending

    def detaches(self, ending: Ending) -> bool:
        """This ending leaves the session open: a resumable connection lost without a close frame
        (the session waits for its client), or replaced by a resumed connection."""
        return ending.code == Close.REPLACED or (self.resumable and ending.code == 1006)

    def protocol_samples(self) -> int:
        """Samples the client sent that the session took (at the client's rate, /v2)."""
        return int(getattr(self.protocol, "client_samples", 0))

    def attach(self, ws: ServerConnection, items: list[Any]) -> None:
        """A resumed connection takes the session over: what it hears first is `items`."""
        self.ws = ws
        self.outbox = []
        self.unsent_bytes = 0
        self.bytes_sent = 0
        self.overflowed.clear()
        self._queue(items)

    async def _serve(self, session: Session) -> Ending:
        """Run until the session ends, free the slot, send the protocol's closing messages."""
        receiver = asyncio.create_task(self._receive_loop(session))
        watchdog = asyncio.create_task(self._watch_reader())
        overflow = asyncio.create_task(self.overflowed.wait())
        gone = asyncio.create_task(self.ws.wait_closed())
        replaced = asyncio.create_task(self.replaced.wait())
        tasks = (receiver, watchdog, overflow, gone, replaced)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._handling is not None and not self._handling.done():
            # A command being applied (audio, a flush) completes: it needs the engine, not the
            # socket, and a resumed session must hold exactly what the client was told it took.
            await asyncio.gather(self._handling, return_exceptions=True)
        not_reading = False
        if receiver.done() and not receiver.cancelled() and receiver.exception() is None:
            ending = receiver.result()
        elif replaced.done() and not replaced.cancelled():
            return Ending(Close.REPLACED, "replaced by a resumed connection")
        elif (watchdog.done() and not watchdog.cancelled()) or (overflow.done() and not overflow.cancelled()):
            not_reading = True
            if overflow.done() and not overflow.cancelled():
                ending = Ending(Close.POLICY, f"client is not reading: over {MAX_OUTPUT_BYTES} bytes of "
                                              "output wait for it")
            else:
                ending = Ending(Close.POLICY, f"client is not reading: over {MAX_UNREAD_BYTES} bytes of "
                                              f"output unread for {UNREAD_GRACE_S:g} s")
            log.bind(session_id=session.id).warning(
                "client_not_reading", unsent_bytes=self.unsent_bytes + self._write_buffer())
        elif gone.done() and not gone.cancelled():
            ending = Ending(self.ws.close_code or 1006, self.ws.close_reason or "connection lost")
        else:
            receiver.result()  # the receive side failed: the handler logs it and closes with 1011
            raise AssertionError("unreachable")
        if self.detaches(ending):  # no close frame: the phone may come back
            return ending
        session.release()  # the slot is free before the closing handshake, however long that takes
        client_gone = ending.code in (1005, 1006) or ending.code >= 4000
        self.not_reading = not_reading
        if not client_gone and not not_reading:  # a client that does not read gets no more
            try:  # error / closing messages of the protocol, then the close frame
                self.outbox.extend(self.protocol.closing(ending.code, ending.reason, ending.error))
                await asyncio.wait_for(self._send_pending(), timeout=CLOSING_SEND_S)
            except (ConnectionClosed, TimeoutError):
                pass
        return ending

    async def _receive_loop(self, session: Session) -> Ending:
        interrupted = asyncio.ensure_future(session.interrupted.wait())
        recv: asyncio.Future[str | bytes] | None = None
        try:
            while True:
                recv = asyncio.ensure_future(self.ws.recv())
                done, _ = await asyncio.wait({recv, interrupted}, return_when=asyncio.FIRST_COMPLETED)
                if recv in done:
                    try:
                        message = recv.result()
                    except ConnectionClosed as exc:
                        rcvd = exc.rcvd
                        return Ending(rcvd.code, rcvd.reason) if rcvd else Ending(1006, "connection lost")
                    session.heard()
                    if self.metrics is not None:
                        self.metrics.messages_in.inc()
                    self._handling = asyncio.ensure_future(
                        self._handle(session, message, time.perf_counter()))
                    ended = await asyncio.shield(self._handling)
                    if ended is not None:
                        return ended
                else:
                    recv.cancel()  # websockets' recv() is cancellation-safe: nothing is lost
                # Checked after a received message is handled: what arrived is transcribed.
                if session.interrupted.is_set():
                    return await self._interrupted(session)
        finally:
            interrupted.cancel()
            if recv is not None:
                if not recv.done():
                    recv.cancel()  # the session is cancelled (the client left, or the daemon cuts it)
                elif not recv.cancelled():
                    recv.exception()  # retrieved: a close that raced the cancellation is expected

    async def _interrupted(self, session: Session) -> Ending:
        ending = session.interruption
        assert ending is not None
        if ending.code == Close.GOING_AWAY:
            await session.flush(self.protocol.drain())
            # Say exactly how much audio the transcript covers, so the client can resend the rest.
            return Ending(Close.GOING_AWAY, f"server shutting down; transcribed the first "
                                            f"{session.samples_in} samples")
        return ending

    async def _handle(self, session: Session, message: str | bytes, arrived: float) -> Ending | None:
        """Apply one client message (arrived at `arrived`, perf_counter); an Ending when the
        session must end."""
        for command in self.protocol.commands(message):
            if isinstance(command, AudioIn):
                await self._detect_voice(command.samples)
                await session.feed(command.samples, arrived)
            elif isinstance(command, VadReset):
                if self.detector is not None:
                    self.detector.reset()
            elif isinstance(command, FlushIn):
                await session.flush(self.protocol.drain())
                self._queue(self.protocol.flushed(command.id))
            elif isinstance(command, FinishIn):
                await session.flush(self.protocol.drain())
                return Ending(Close.NORMAL, "end of audio: transcript complete")
            elif isinstance(command, MarkerIn):
                if not session.mark(command.id):
                    return Ending(Close.POLICY, f"too many markers: {MAX_MARKERS} wait for their audio "
                                                "to be transcribed", "too_many_markers")
            elif isinstance(command, Reply):
                self._queue(command.items)
            elif isinstance(command, Reject):
                return Ending(command.code, command.reason, command.error)
        return None

    async def _detect_voice(self, samples: np.ndarray) -> None:
        """Voice activity on the client's audio, when its protocol asks for it (off the loop)."""
        settings = self.protocol.vad_settings
        if settings is None:
            return
        loop = asyncio.get_running_loop()
        if self.detector is None or self.detector.settings != settings:
            self.detector = await loop.run_in_executor(vad_threads(), SpeechDetector, settings)
        events = await loop.run_in_executor(vad_threads(), self.detector.push, samples)
        self._queue(self.protocol.on_vad(events))

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

    async def _send_pending(self) -> None:
        if not self.outbox:
            return
        items = self.outbox[:]  # a slow reader gets text merged, never dropped
        self.outbox.clear()
        self.unsent_bytes = 0
        self.outbox_ready.clear()
        for message in self.protocol.wire(items):
            self.bytes_sent += len(message)
            await self.ws.send(message)
            self.sent_messages += 1
            if self.metrics is not None:
                self.metrics.messages_out.inc()
        if self.session is not None:
            self.session.output_sent()

    async def _send_loop(self) -> None:
        """Writes output as it comes; while a send waits on a slow client, items pile up and
        text is merged into the next message."""
        while True:
            await self.outbox_ready.wait()
            try:
                await self._send_pending()
            except ConnectionClosed:
                return  # the receive side reports the close


class Resumables:
    """/v2 sessions that may be resumed: by token, those attached and those waiting for their
    client to come back (for `resume_grace` seconds; their slot stays busy meanwhile)."""

    def __init__(self, gateway: Gateway, grace: float, metrics: Metrics | None = None) -> None:
        self.gateway = gateway
        self.grace = grace
        self.metrics = metrics
        self.streams: dict[str, WsStream] = {}  # resume token -> stream
        self._expiry: dict[str, asyncio.Task[None]] = {}  # token -> the wait of a detached one
        self.resumed = 0
        self.expired = 0

    @property
    def waiting(self) -> int:
        return len(self._expiry)

    def counts(self) -> dict[str, int]:
        return {"waiting": self.waiting, "resumed": self.resumed, "expired": self.expired}

    def register(self, token: str, stream: WsStream) -> None:
        stream.resumable = True
        self.streams[token] = stream

    def forget(self, token: str) -> None:
        self.streams.pop(token, None)
        expiry = self._expiry.pop(token, None)
        if expiry is not None and expiry is not asyncio.current_task():
            expiry.cancel()
            if self.metrics is not None:
                self.metrics.sessions_waiting.dec()

    def detach(self, token: str, stream: WsStream, session: Session) -> None:
        """The connection ended without a close: the session waits `grace` seconds."""
        if token in self._expiry:
            return
        session.busy += 1  # the idle clock stops while nobody can send
        self._expiry[token] = asyncio.get_running_loop().create_task(self._expire(token, stream, session))
        log.bind(session_id=session.id, peer=session.peer, frontend=session.frontend).info(
            "session_detached", grace_s=self.grace, samples=stream.protocol_samples())
        if self.metrics is not None:
            self.metrics.sessions_waiting.inc()

    async def _expire(self, token: str, stream: WsStream, session: Session) -> None:
        try:
            await asyncio.sleep(self.grace)
        except asyncio.CancelledError:
            return
        self._expiry.pop(token, None)
        self.streams.pop(token, None)
        self.expired += 1
        if self.metrics is not None:
            self.metrics.sessions_waiting.dec()
            self.metrics.sessions_expired.inc()
        log.bind(session_id=session.id, peer=session.peer, frontend=session.frontend).info(
            "session_expired", grace_s=self.grace)
        self.gateway.close(session, Ending(1006, f"connection lost; not resumed within {self.grace:g} s"))

    def find(self, token: str, owner: str | None) -> WsStream | None:
        """The stream a resume token names, if it is still open and `owner` opened it."""
        stream = self.streams.get(token)
        if stream is None or stream.session is None or stream.session.released:
            return None
        if stream.owner_token != owner:
            return None
        return stream

    def claim(self, token: str, stream: WsStream) -> None:
        """A resumed connection has the stream: it no longer waits (its expiry is cancelled)."""
        expiry = self._expiry.pop(token, None)
        if expiry is not None and stream.session is not None:
            expiry.cancel()
            stream.session.busy -= 1
            if self.metrics is not None:
                self.metrics.sessions_waiting.dec()

    def end_waiting(self, ending: Ending) -> None:
        """Draining: sessions without a connection cannot get their last words; they end now."""
        for token in list(self._expiry):
            stream = self.streams.get(token)
            self.forget(token)
            if stream is not None and stream.session is not None:
                self.gateway.close(stream.session, ending)


async def _serve_attached(gateway: Gateway, stream: WsStream, session: Session,
                          resumables: Resumables | None, token: str | None) -> None:
    """Run the stream on its current connection; then close the session, or let it wait; then
    close the connection (within CLOSING_SEND_S: the session's bookkeeping never waits for it)."""
    ws = stream.ws
    session.closer = functools.partial(close_within, ws)
    session.task = asyncio.current_task()
    ending = Ending(Close.INTERNAL, "internal error")
    try:
        ending = await stream.run(session)
    except asyncio.CancelledError:
        _settle(gateway, stream, ws, session, resumables, token, ending)
        abort(ws)
        raise
    except Exception:
        log.bind(session_id=session.id, peer=session.peer, frontend=session.frontend).exception(
            "session_failed")
    _settle(gateway, stream, ws, session, resumables, token, ending)
    if ending.code not in (1005, 1006):
        # (A client that does not read gets its close frame only if it reads again soon.)
        await close_within(ws, ending.code, ending.reason,
                           UNREAD_GRACE_S if stream.not_reading else CLOSING_SEND_S)


def _settle(gateway: Gateway, stream: WsStream, ws: ServerConnection, session: Session,
            resumables: Resumables | None, token: str | None, ending: Ending) -> None:
    """After a connection's run: the session waits for its client (a resumable connection lost),
    or ends. Only the connection the stream is on decides: once a resumed connection has taken
    the session over, the one it replaced leaves it alone."""
    if stream.ws is not ws or (stream.taking_over and stream.detaches(ending)):
        return  # (the resumed connection has the session, or claims it now)
    waits = resumables is not None and token is not None and gateway.serving
    if stream.detaches(ending) and waits and not session.released:
        assert resumables is not None and token is not None
        resumables.detach(token, stream, session)  # (also a takeover that gave up: it waits)
        return
    if resumables is not None and token is not None:
        resumables.forget(token)
    gateway.close(session, ending)


async def serve_connection(gateway: Gateway, ws: ServerConnection, path: str, protocol: Protocol,
                           session_id: str, metrics: Metrics | None, resumables: Resumables | None = None,
                           token: str | None = None, owner: str | None = None,
                           max_message_bytes: int | None = None) -> None:
    """The handler of one accepted WebSocket: admission, then the stream until it ends.

    Args:
        token: the session's resume token (/v2 with resume_grace > 0), else None.
        owner: the auth token the client connected with (only it may resume the session).
        max_message_bytes: a larger message size for this path, allowed once admitted (then at
            most one more message waits in websockets' queue: its queue counts frames).
    """
    stream = WsStream(ws, protocol, metrics)
    stream.owner_token = owner
    try:
        session = await gateway.open(path, peer_of(ws), stream, session_id)
    except Refused as exc:
        await close_within(ws, Close.TRY_AGAIN, str(exc))
        return
    if max_message_bytes is not None:
        ws.protocol.max_message_size = max_message_bytes
        ws.recv_messages.high, ws.recv_messages.low = 1, 0
    if resumables is not None and token is not None:
        resumables.register(token, stream)
    await _serve_attached(gateway, stream, session, resumables, token)


async def resume_connection(gateway: Gateway, ws: ServerConnection, resumables: Resumables, token: str,
                            last_seq: int, owner: str | None) -> None:
    """A /v2 client comes back with its resume token: it takes its session over, hears `resumed`
    and every numbered event after `last_seq`, and sends its audio from `samples` on."""
    stream = resumables.find(token, owner)
    if stream is None or stream.session is None:
        await _refuse_resume(ws, "unknown or expired resume token")
        return
    session = stream.session
    bound = log.bind(session_id=session.id, peer=peer_of(ws), frontend=session.frontend)
    async with stream.resume_lock:  # (a client resuming twice at once: one after the other)
        if not stream.released_connection.is_set():  # the old connection is still open: take over
            stream.taking_over = True
            stream.replaced.set()
            try:
                await asyncio.wait_for(stream.released_connection.wait(), TAKEOVER_S)
            except TimeoutError:
                # Still applying a long command (the engine's work): the session stays with it
                # and waits for a resume once it lets go.
                bound.warning("resume_takeover_slow", seconds=TAKEOVER_S)
                await close_within(ws, Close.TRY_AGAIN, "resume: the previous connection is still "
                                                        "finishing a command; try again in a moment")
                return
            finally:
                stream.taking_over = False
        if session.released or resumables.streams.get(token) is not stream:  # ended meanwhile
            await _refuse_resume(ws, "the session ended while the resume waited")
            return
        resumables.claim(token, stream)
        protocol = stream.protocol
        replay = protocol.replay(last_seq) if hasattr(protocol, "replay") else []
        if replay is None or last_seq > getattr(protocol, "seq", 0) or last_seq < 0:
            resumables.forget(token)
            gateway.close(session, Ending(Close.RESUME_TOO_LATE, "resume: events after last_seq are gone"))
            await close_within(ws, Close.RESUME_TOO_LATE, f"resume: the events after seq {last_seq} are no "
                                                          "longer kept (or never were): start a new session")
            return
        stream.attach(ws, [protocol.resumed(), *replay])  # type: ignore[attr-defined]
        session.peer = peer_of(ws)
        session.heard()
        resumables.resumed += 1
        if resumables.metrics is not None:
            resumables.metrics.sessions_resumed.inc()
        bound.info("session_resumed", last_seq=last_seq, replayed=len(replay),
                   samples=stream.protocol_samples())
    await _serve_attached(gateway, stream, session, resumables, token)


async def _refuse_resume(ws: ServerConnection, why: str) -> None:
    log.warning("resume_refused", peer=peer_of(ws), reason=why)
    await close_within(ws, Close.RESUME_UNKNOWN, f"resume: no session waits under this token ({why}); "
                                                 "start a new one")
