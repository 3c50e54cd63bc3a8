"""Hostile and unlucky clients on the real daemon: every bad input gets its documented close code
and reason, a client that stops reading is closed with 1008 (and one that reads never is), and a
client that leaves gives its slot back at once."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from pinguin_daemon.model import loader

from .daemon import DaemonProcess, flushed_audio, http_get, reference_tokens, reference_words
from .test_server_v2 import v2_session, words_of

SLOTS = 3


@pytest.fixture(scope="module")
def daemon(synthetic_candle_dir: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess("--model", str(synthetic_candle_dir), "--dtype", "f32",
                         "--max-sessions", str(SLOTS))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def ref_model(candle_ref_model: loader.LoadedModel) -> loader.LoadedModel:
    return candle_ref_model


def ws_url(proc: DaemonProcess, path: str) -> str:
    return f"ws://127.0.0.1:{proc.port}{path}"


async def close_seen(ws: ClientConnection, timeout: float = 60) -> tuple[int, str]:
    """Read until the server closes (never a hang: bounded); the close code and reason."""
    try:
        async with asyncio.timeout(timeout):
            async for _ in ws:
                pass
    except ConnectionClosed:
        pass
    assert ws.close_code is not None
    return ws.close_code, ws.close_reason or ""


async def send_one_bad(address: str, payload: str | bytes, before: bytes | None = None) -> tuple[int, str]:
    async with connect(address, max_size=None) as ws:
        if before is not None:
            await ws.send(before)
        await ws.send(payload)
        return await close_seen(ws)


@pytest.mark.parametrize(
    ("path", "payload", "code", "reason"),
    [
        ("/v2", "[" * 100_000 + "]" * 100_000, 1007, "malformed JSON: nested too deeply"),
        ("/v2", '{"type": "' + "é" * 300 + '"}', 1003, "unknown message type"),
        ("/api/asr-streaming", msgpack.packb({"type": "Audio", "pcm": ["a", "b"]}), 1007,
         "Audio.pcm must be a flat list of numbers"),
        ("/api/asr-streaming", msgpack.packb({"type": "Audio", "pcm": [[0.1, 0.2], [0.3]]}), 1007,
         "Audio.pcm must be a flat list of numbers"),
        ("/api/asr-streaming", msgpack.packb({"type": "Audio", "pcm": [None, {}]}), 1007,
         "Audio.pcm must be a flat list of numbers"),
    ],
    ids=["v2-deep-json", "v2-long-type", "kyutai-pcm-strings", "kyutai-pcm-ragged", "kyutai-pcm-null"],
)
def test_hostile_messages_get_their_close_code_and_the_neighbour_is_exact(
        daemon: DaemonProcess, ref_model: loader.LoadedModel, speech_clips: list[np.ndarray],
        path: str, payload: str | bytes, code: int, reason: str) -> None:
    clip = speech_clips[3]

    async def both() -> tuple[tuple[int, str], tuple[list[dict[str, Any]], int]]:
        chunks = [clip[i:i + 2400].astype("<f4").tobytes() for i in range(0, len(clip), 2400)]
        good = asyncio.create_task(v2_session(ws_url(daemon, "/v2"), None, chunks))
        await asyncio.sleep(0.3)
        return await send_one_bad(ws_url(daemon, path), payload), await good

    (got_code, got_reason), (good, good_code) = asyncio.run(both())
    assert got_code == code and got_reason.startswith(reason)
    assert len(got_reason.encode()) <= 123  # a close frame's reason; longer ones would be a 1011
    expected = reference_words(ref_model, reference_tokens(ref_model, flushed_audio(clip, ref_model)))
    assert good_code == 1000 and words_of(good) == expected


def test_json_logs_carry_the_exception_text() -> None:
    script = ("from pinguin_daemon.logs import configure_logging, get_logger\n"
              "configure_logging('json')\n"
              "try:\n    {}['missing-key']\n"
              "except KeyError:\n    get_logger('t').exception('it_broke')\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    record = json.loads(out.stderr.strip().splitlines()[-1])
    assert record["event"] == "it_broke"
    assert "Traceback" in record["exception"] and "KeyError: 'missing-key'" in record["exception"]


def not_reading_socket(port: int) -> socket.socket:
    """A connected socket with a small receive buffer, so that a client that stops reading
    leaves the output in the daemon rather than in the kernel."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    return sock


def test_a_client_that_stops_reading_is_closed_with_1008(daemon: DaemonProcess) -> None:
    # Each `start` (before any audio) is answered with a `ready`: a client that keeps asking and
    # never reads piles up output in the daemon.
    start = json.dumps({"type": "start", "encoding": "f32", "sample_rate": 24000})

    async def scenario() -> tuple[int, str]:
        # max_queue=1: the client library stops reading the socket once one message waits.
        async with connect(ws_url(daemon, "/v2"), sock=not_reading_socket(daemon.port),
                           max_queue=1, max_size=None) as ws:
            before = len(daemon.events("client_not_reading"))
            sent = 0
            while len(daemon.events("client_not_reading")) == before:
                assert sent < 200_000, "the daemon never noticed"
                try:
                    for _ in range(500):
                        await ws.send(start)
                except ConnectionClosed:
                    break
                sent += 500
                await asyncio.sleep(0.01)
            assert http_get(daemon.port, "/readyz")[0] == 200
            # The client reads again (within the 2 s the close waits): what was sent, then 1008.
            return await close_seen(ws)

    code, reason = asyncio.run(scenario())
    assert code == 1008
    assert reason.startswith("client is not reading: over ")


def test_a_client_that_never_reads_again_loses_its_session_and_its_connection(daemon: DaemonProcess) -> None:
    """Its close frame can never leave: the session ends at once anyway, and the connection is
    aborted (it would otherwise hold its place in the connection budget for good)."""
    start = json.dumps({"type": "start", "encoding": "f32", "sample_rate": 24000})

    async def scenario() -> dict[str, Any]:
        async with connect(ws_url(daemon, "/v2"), sock=not_reading_socket(daemon.port),
                           max_queue=1, max_size=None, close_timeout=0.1) as ws:
            before = len(daemon.events("client_not_reading"))
            while len(daemon.events("client_not_reading")) == before:
                try:
                    for _ in range(500):
                        await ws.send(start)
                except ConnectionClosed:
                    break
                await asyncio.sleep(0.01)
            async with asyncio.timeout(30):  # meanwhile the client reads nothing at all
                while True:
                    status = json.loads(http_get(daemon.port, "/status")[1])
                    if status["sessions"] == 0 and status["connections"] == 1:  # (this request)
                        return status
                    await asyncio.sleep(0.2)

    status = asyncio.run(scenario())
    assert status["free_slots"] == SLOTS


def test_a_flush_id_is_echoed_up_to_256_characters_and_refused_beyond(daemon: DaemonProcess) -> None:
    silence = np.zeros(4800, "<f4").tobytes()
    fits = {"type": "flush", "id": "é" * 256}

    async def scenario() -> tuple[list[dict[str, Any]], tuple[int, str]]:
        async with connect(ws_url(daemon, "/v2")) as ws:
            await ws.send(silence)
            await ws.send(json.dumps(fits))
            received: list[dict[str, Any]] = []
            while not received or received[-1]["type"] != "flushed":
                received.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
            await ws.send(json.dumps({"type": "flush", "id": "x" * 257}))
            while received[-1]["type"] != "closing":
                received.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
            return received, await close_seen(ws)

    received, (code, reason) = asyncio.run(scenario())
    assert [m["id"] for m in received if m["type"] == "flushed"] == [fits["id"]]
    assert {"type": "error", "code": "bad_flush", "message": reason} in received
    assert code == 1007 and "at most 256 characters" in reason


def test_sequential_reconnects_are_never_refused_by_their_own_ghost(synthetic_dir: Path) -> None:
    """A client that drops and reconnects (Wi-Fi switch), again and again, one at a time: every
    connection is admitted, with two slots. (On an endpoint without resumption: a dropped /v2
    session keeps its slot for resume_grace, tests/test_resume.py.)"""
    proc = DaemonProcess("--model", str(synthetic_dir), "--dtype", "f32", "--max-sessions", "2")
    try:
        async def one_visit() -> str:
            ws = await connect(f"ws://127.0.0.1:{proc.port}/api/asr-streaming")
            try:
                first = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 30))
            except ConnectionClosed:
                return f"refused {ws.close_code} {ws.close_reason}"
            for _ in range(3):  # 0.3 s of audio
                pcm = np.random.default_rng(0).normal(0, 0.1, 2400).astype(np.float32).tolist()
                await ws.send(msgpack.packb({"type": "Audio", "pcm": pcm}))
            ws.transport.abort()  # gone, without a close frame
            return str(first["type"])

        async def visits(n: int) -> list[str]:
            return [await one_visit() for _ in range(n)]

        outcomes = asyncio.run(visits(40))
        assert outcomes == ["Ready"] * 40
        assert not proc.events("session_refused")
    finally:
        proc.stop()


def test_abrupt_disconnects_free_every_slot_within_a_second(daemon: DaemonProcess) -> None:
    async def scenario() -> float:
        sockets = [await connect(ws_url(daemon, "/api/asr-streaming")) for _ in range(SLOTS)]
        for ws in sockets:
            assert msgpack.unpackb(await ws.recv())["type"] == "Ready"
        status, body = http_get(daemon.port, "/readyz")
        assert json.loads(body)["free_slots"] == 0
        for ws in sockets:
            for _ in range(4):
                await ws.send(msgpack.packb({"type": "Audio", "pcm": [0.0] * 2400}))
        await asyncio.sleep(0.2)  # mid-stream: frames are being encoded and stepped
        for ws in sockets:
            ws.transport.abort()
        gone = time.monotonic()
        while json.loads(http_get(daemon.port, "/readyz")[1])["free_slots"] < SLOTS:
            assert time.monotonic() - gone < 10, "slots never came back"
            await asyncio.sleep(0.01)
        return time.monotonic() - gone

    assert asyncio.run(scenario()) < 1.0
