"""Fan-out to one socket: a slow reader gets its text merged, never dropped; the reader watchdog
closes a client that stopped reading and never one that reads, however large a message."""

from __future__ import annotations

import asyncio

import pytest

from pinguin_daemon.engine.events import TextPiece
from pinguin_daemon.server import websocket as websocket_mod
from pinguin_daemon.server.protocols import SeedProtocol, SessionInfo
from pinguin_daemon.server.websocket import MAX_UNREAD_BYTES, WsStream


class FakeTransport:
    """The kernel side of a socket: it takes bytes only while the client reads."""

    def __init__(self) -> None:
        self.buffered = 0

    def get_write_buffer_size(self) -> int:
        return self.buffered


class GatedSocket:
    """A client that reads only while the test opens the gate."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.gate = asyncio.Event()
        self.transport = FakeTransport()

    async def send(self, text: str) -> None:
        self.transport.buffered += len(text)
        await self.gate.wait()
        self.transport.buffered -= len(text)
        self.sent.append(text)


def piece(text: str) -> TextPiece:
    return TextPiece(text, 100, 1)


def new_session(ws: GatedSocket) -> WsStream:
    info = SessionInfo("s", "synthetic", 0.5, 6, 0, 1, 0.5, 0)
    return WsStream(ws, SeedProtocol(info))  # type: ignore[arg-type]


def deliver(stream: WsStream, events: list[TextPiece]) -> None:
    """One engine step of the session, as its Session hands it to the WebSocket side."""
    stream.on_step(events, 1, 0)  # type: ignore[arg-type]


def test_slow_reader_gets_merged_text() -> None:
    async def scenario() -> list[str]:
        ws = GatedSocket()
        session = new_session(ws)
        sender = asyncio.create_task(session._send_loop())
        deliver(session, [piece(" hel")])
        await asyncio.sleep(0.01)  # the sender is now stuck in send(" hel")
        deliver(session, [piece("lo")])
        deliver(session, [])  # a step without text
        deliver(session, [piece(" world")])
        ws.gate.set()
        await asyncio.sleep(0.01)
        sender.cancel()
        return ws.sent

    assert asyncio.run(scenario()) == [" hel", "lo world"]


@pytest.fixture
def quick_watchdog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(websocket_mod, "UNREAD_GRACE_S", 0.3)
    monkeypatch.setattr(websocket_mod, "READER_CHECK_S", 0.02)


async def watch(session: WsStream, seconds: float) -> bool:
    """True when the watchdog decided within `seconds` that the client is not reading."""
    watchdog = asyncio.create_task(session._watch_reader())
    done, _ = await asyncio.wait({watchdog}, timeout=seconds)
    watchdog.cancel()
    return watchdog in done


def test_a_client_that_stops_reading_is_caught(quick_watchdog: None) -> None:
    async def scenario() -> tuple[bool, bool]:
        ws = GatedSocket()
        session = new_session(ws)
        sender = asyncio.create_task(session._send_loop())
        deliver(session, [piece("x" * 100)])
        under_bound = await watch(session, 1.0)  # stuck, but little is waiting: not yet
        deliver(session, [piece("y" * MAX_UNREAD_BYTES)])
        over_bound = await watch(session, 1.0)
        sender.cancel()
        return under_bound, over_bound

    assert asyncio.run(scenario()) == (False, True)


def test_a_reader_is_never_closed_for_one_large_message(quick_watchdog: None) -> None:
    async def scenario() -> bool:
        ws = GatedSocket()
        session = new_session(ws)
        sender = asyncio.create_task(session._send_loop())
        deliver(session, [piece("z" * (3 * MAX_UNREAD_BYTES))])  # over the bound by itself

        async def slow_reader() -> None:  # drains in small steps, slower than the grace
            for _ in range(30):
                await asyncio.sleep(0.05)
                ws.transport.buffered = max(0, ws.transport.buffered - MAX_UNREAD_BYTES // 8)
            ws.gate.set()

        reader = asyncio.create_task(slow_reader())
        caught = await watch(session, 1.6)
        reader.cancel()
        sender.cancel()
        return caught

    assert asyncio.run(scenario()) is False
