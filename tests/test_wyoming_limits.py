"""Wyoming's limits: clients that never read, never stream or hang idle cannot hold the side
ports' share of the connection budget, and every end is clean (no traceback, no text after
`transcript-stop`). A real daemon with a small budget, real sockets and wyoming's own client."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from wyoming.asr import Transcribe
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe

from pinguin_daemon.engine.events import EndOfTurnProbs, TextPiece
from pinguin_daemon.server.wyoming_server import QUIET_S, WyomingServer, encode

from .daemon import DaemonProcess, http_get
from .test_front_door import Wyoming, free_port

TOKEN = "sk-limits"
MAX_CONNECTIONS = 16  # the least allowed: the side ports get 12 of them
SIDE_LIMIT = 12
IDLE_S = 2


@pytest.fixture(scope="module")
def daemon(synthetic_dir: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess("--model", str(synthetic_dir), "--dtype", "f32", "--max-sessions", "2",
                         "--auth-tokens", TOKEN, "--http-port", str(free_port()),
                         "--wyoming-port", str(free_port()), "--wyoming-allow", "127.0.0.1",
                         "--idle-timeout", str(IDLE_S), "--max-connections", str(MAX_CONNECTIONS))
    yield proc
    proc.stop()


def wyoming_port(proc: DaemonProcess) -> int:
    return int(str(proc.events("listening")[0]["wyoming_port"]))


def open_connections(proc: DaemonProcess) -> int:
    """Connections the daemon counts in its budget (this request's own included)."""
    _, body = http_get(proc.port, "/status", {"Authorization": f"Bearer {TOKEN}"})
    return int(json.loads(body)["connections"])


def tracebacks(proc: DaemonProcess) -> list[str]:
    return [line for line in proc.raw if "Traceback" in line or "Unhandled exception" in line]


def non_reader(port: int, describes: int) -> socket.socket:
    """A client that sends `describe` after `describe` and never reads an `info` (its receive
    buffer small, so that the answers pile up in the daemon)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    sock.sendall(encode(Describe().event()) * describes)
    return sock


def ended(sock: socket.socket) -> bool:
    """Reads what is left: True when the daemon has ended the connection (EOF or reset)."""
    sock.settimeout(20)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


async def info_or_none(port: int) -> Event | None:
    """Home Assistant asking `describe`: the `info`, or None when the connection was refused."""
    try:
        async with Wyoming(port) as client:
            await client.send(Describe().event())
            return await client.read(timeout=10)
    except (ConnectionError, TimeoutError):
        return None


def test_clients_that_never_read_lose_their_connections_and_home_assistant_gets_in(
        daemon: DaemonProcess) -> None:
    port = wyoming_port(daemon)
    # About 14 MB of `info` each: more than the kernel's socket buffers take in (loopback
    # autotunes them to several MB), so that the rest waits in the daemon.
    flood = [non_reader(port, 20_000) for _ in range(SIDE_LIMIT)]
    try:
        refused = asyncio.run(info_or_none(port))  # the side ports' share is taken
        deadline = time.monotonic() + 60
        info = None
        while info is None and time.monotonic() < deadline:
            info = asyncio.run(info_or_none(port))
            time.sleep(0.2)
        assert refused is None and daemon.events("connection_refused")
        assert info is not None and info.type == "info"  # the flood still never read a byte
        deadline = time.monotonic() + 30
        while open_connections(daemon) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert open_connections(daemon) == 1  # every place is back: only this request is counted
        assert all(ended(sock) for sock in flood)
    finally:
        for sock in flood:
            sock.close()
    cut = [r for r in daemon.events("wyoming_error") if r["code"] == "not_reading"]
    assert len(cut) == SIDE_LIMIT
    assert tracebacks(daemon) == []


def test_an_idle_stream_ends_with_an_error_and_no_traceback(daemon: DaemonProcess) -> None:
    """The idle timeout comes while the next event is being read: the `error`, then a clean end."""
    async def scenario() -> list[Event]:
        async with Wyoming(wyoming_port(daemon)) as client:
            await client.send(Transcribe(language="en").event())
            await client.send(AudioStart(rate=16000, width=2, channels=1).event())
            return await client.until_end(timeout=IDLE_S + 20)

    before = len(daemon.events("wyoming_error"))
    events = asyncio.run(scenario())
    assert [e.type for e in events] == ["transcript-start", "error"]
    error = Error.from_event(events[1])
    assert error.code == "idle" and error.text == f"idle: nothing received for {IDLE_S} s"
    assert len(daemon.wait_event("wyoming_error", before + 1)) == before + 1
    time.sleep(0.5)  # the handler's end (its linger) is logged, if anything, by now
    assert tracebacks(daemon) == []


def test_a_connection_that_never_streams_ends_after_quiet_s(daemon: DaemonProcess) -> None:
    """`describe` every half second, read each time: still, no audio, no place in the budget."""
    async def scenario() -> int | None:
        """How many `info`s came before the daemon ended the connection (None: it never did)."""
        infos = 0
        async with Wyoming(wyoming_port(daemon)) as client:
            try:
                for _ in range(int(4 * QUIET_S)):  # 20 s of asking, twice QUIET_S
                    await client.send(Describe().event())
                    if await client.read(timeout=10) is None:
                        return infos
                    infos += 1
                    await asyncio.sleep(0.5)
            except ConnectionError:
                return infos
        return None

    before = len(daemon.events("wyoming_quiet"))
    infos = asyncio.run(scenario())
    assert infos  # served a while, then the end came from the daemon
    assert len(daemon.wait_event("wyoming_quiet", before + 1)) == before + 1
    assert tracebacks(daemon) == []


class LateSession:
    """A session whose engine ends the turn at the first chunk with one more step in flight
    (delivered after the stream's transcript went out): no model, the connection's own code."""

    def __init__(self, listener: Any) -> None:
        self.listener = listener
        self.interrupted = asyncio.Event()
        self.closer: Any = None

    def heard(self) -> None:
        pass

    async def feed(self, samples: np.ndarray) -> None:
        self.listener.on_step([TextPiece(" turn on", 1, 1), EndOfTurnProbs(1, (0.0, 0.99))], 1, 0)
        asyncio.get_running_loop().call_soon(self.listener.on_step, [TextPiece(" the fan", 2, 2)], 2, 0)


class LateGateway:
    def __init__(self) -> None:
        self.closed: list[Any] = []

    async def open(self, frontend: str, peer: str, listener: Any) -> LateSession:
        return LateSession(listener)

    def close(self, session: LateSession, ending: Any = None) -> None:
        self.closed.append(ending)


def test_no_transcript_chunk_after_transcript_stop() -> None:
    """Steps still in flight at the model's end of turn are not written after `transcript-stop`
    (older Home Assistant versions would read them as the next utterance's)."""
    async def scenario() -> tuple[list[str], list[str], list[Any]]:
        gateway = LateGateway()
        wyoming = WyomingServer(gateway, "model", auth_required=False, allow=())  # type: ignore[arg-type]
        server = await asyncio.get_running_loop().create_server(wyoming.protocol_factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        seen: list[str] = []
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(Transcribe(language="en").event())
            await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
            await client.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=bytes(3200)).event())
            while not seen or seen[-1] != "transcript-stop":
                event = await asyncio.wait_for(client.read_event(), 10)
                assert event is not None
                seen.append(event.type if event.type != "transcript-chunk" else event.data["text"])
            await client.write_event(AudioStop().event())  # Home Assistant's own end, later
            await client.write_event(Describe().event())
            event = await asyncio.wait_for(client.read_event(), 10)
            after = [event.type if event is not None else "end"]
        server.close()
        return seen, after, gateway.closed

    seen, after, closed = asyncio.run(scenario())
    assert seen == ["transcript-start", "turn on", "transcript", "transcript-stop"]
    assert after == ["info"]  # not " the fan"
    assert [ending.code for ending in closed] == [1000]
