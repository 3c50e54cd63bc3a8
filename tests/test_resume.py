"""A phone that drops its connection keeps its transcript: a /v2 session survives an abnormal
disconnect for `resume_grace`, the client resumes with its token and `last_seq`, resends its
audio from `samples`, and ends with exactly the transcript of a session that never dropped."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soxr
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from pinguin_daemon.client import stream

from .daemon import DaemonProcess, http_get

TOKENS = ("sk-phone", "sk-other")
RATE = 16000  # the phone sends 16 kHz s16: `samples` counts at the client's rate
CHUNK = 1600  # 100 ms


@pytest.fixture(scope="module")
def daemon(synthetic_candle_dir: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess("--model", str(synthetic_candle_dir), "--dtype", "f32", "--max-sessions", "3",
                         "--auth-tokens", ",".join(TOKENS))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def speech20(speech_clips: list[np.ndarray]) -> np.ndarray:
    """~20 s of speech with pauses, at 16 kHz s16 (what the phone sends)."""
    pause = np.zeros(12000, np.float32)
    audio = np.concatenate([x for clip in speech_clips for x in (clip, pause)])
    audio = np.concatenate([audio, speech_clips[0]])[: 24000 * 20]
    return (np.clip(soxr.resample(audio, 24000, RATE), -1, 1) * 32767).astype("<i2")


class Phone:
    """A /v2 client that numbers what it heard and can lose its connection."""

    def __init__(self, port: int, token: str = TOKENS[0], rate: int = RATE) -> None:
        self.port, self.token, self.rate = port, token, rate
        self.ws: ClientConnection | None = None
        self.events: list[dict[str, Any]] = []  # every numbered event, in arrival order
        self.others: list[dict[str, Any]] = []  # ready, resumed, closing, ...
        self.resume_token = ""
        self._reader: asyncio.Task[None] | None = None
        self.close: tuple[int, str] | None = None

    @property
    def last_seq(self) -> int:
        return self.events[-1]["seq"] if self.events else 0

    async def open(self, query: str = "") -> dict[str, Any]:
        self.ws = await connect(f"ws://127.0.0.1:{self.port}/v2?token={self.token}{query}")
        try:
            first = json.loads(await asyncio.wait_for(self.ws.recv(), 30))
        except ConnectionClosed as exc:  # refused after the handshake
            self.close = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd is not None else None
            return {"type": "closed"}
        self.others.append(first)
        if first["type"] == "ready":
            self.resume_token = first["resume_token"]
            await self.ws.send(json.dumps({"type": "start", "encoding": "s16", "sample_rate": self.rate}))
            self.others.append(json.loads(await self.ws.recv()))
        self._reader = asyncio.create_task(self._read(self.ws))
        return first

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                event = json.loads(message)
                (self.events if "seq" in event else self.others).append(event)
        except ConnectionClosed:
            pass
        rcvd = ws.protocol.close_rcvd
        if rcvd is not None:
            self.close = (rcvd.code, rcvd.reason)

    async def send(self, pcm: np.ndarray) -> None:
        assert self.ws is not None
        for start in range(0, len(pcm), CHUNK):
            await self.ws.send(pcm[start:start + CHUNK].tobytes())

    async def reset(self) -> None:
        """The network goes away: a TCP reset, no close frame."""
        assert self.ws is not None and self._reader is not None
        sock = self.ws.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.ws.transport.abort()
        await asyncio.gather(self._reader, return_exceptions=True)

    def go_silent(self) -> ClientConnection:
        """The app is suspended: it neither sends nor reads, and the socket stays open."""
        assert self.ws is not None and self._reader is not None
        self._reader.cancel()
        ws, self.ws = self.ws, None
        return ws

    async def resume(self) -> dict[str, Any]:
        return await self.open(f"&resume={self.resume_token}&last_seq={self.last_seq}")

    async def finish(self) -> None:
        assert self.ws is not None and self._reader is not None
        await self.ws.send(json.dumps({"type": "finish"}))
        await asyncio.wait_for(self._reader, 60)

    def transcript(self) -> tuple[str, list[tuple[str, Any]]]:
        text = "".join(e["text"] for e in self.events if e["type"] == "text")
        words = [(e["type"], e.get("text"), e.get("start"), e.get("stop")) for e in self.events
                 if e["type"] in ("word", "word_end")]
        return text, words


async def uninterrupted(port: int, pcm: np.ndarray) -> Phone:
    phone = Phone(port)
    await phone.open()
    await phone.send(pcm)
    await phone.finish()
    return phone


@pytest.mark.parametrize("how", ["reset", "silent"])
def test_a_dropped_phone_resumes_with_the_transcript_it_would_have_had(
        daemon: DaemonProcess, speech20: np.ndarray, speech_clips: list[np.ndarray], how: str) -> None:
    cut_at = 8 * RATE

    async def old_close(ws: ClientConnection) -> int | None:
        """The app wakes up and reads what its old connection still holds, to the close."""
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 20)
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd is not None else None

    async def dropped() -> tuple[Phone, dict[str, Any], Any, int | None]:
        neighbour = asyncio.create_task(stream(f"ws://127.0.0.1:{daemon.port}/ws?token={TOKENS[1]}",
                                               speech_clips[1], realtime=True))
        phone = Phone(daemon.port)
        await phone.open()
        await phone.send(speech20[:cut_at])
        await asyncio.sleep(0.3)  # some events are in flight when the network goes
        old = None
        if how == "reset":
            await phone.reset()
        else:
            old = phone.go_silent()
        await asyncio.sleep(1.5)
        resumed = await phone.resume()
        assert resumed["type"] == "resumed"
        old_code = await old_close(old) if old is not None else None
        await phone.send(speech20[resumed["samples"]:])
        await phone.finish()
        return phone, resumed, await neighbour, old_code

    phone, resumed, neighbour, old = asyncio.run(dropped())
    whole = asyncio.run(uninterrupted(daemon.port, speech20))
    alone = asyncio.run(stream(f"ws://127.0.0.1:{daemon.port}/ws?token={TOKENS[1]}", speech_clips[1]))
    assert phone.close == (1000, "end of audio: transcript complete")
    assert 0 < resumed["samples"] <= cut_at  # what the daemon had taken when the line went
    assert [e["seq"] for e in phone.events] == list(range(1, len(phone.events) + 1))  # none twice or missing
    assert phone.transcript() == whole.transcript()
    assert len(phone.transcript()[1]) >= 10
    assert neighbour.text == alone.text and neighbour.close_code == 1000  # the neighbour kept its text
    if how == "silent":  # the suspended connection was taken over, with the documented code
        assert old == 4002
    counts = json.loads(http_get(daemon.port, "/status", {"Authorization": f"Bearer {TOKENS[0]}"})[1])
    assert counts["resumable"]["resumed"] >= 1


def test_only_the_token_that_opened_a_session_resumes_it(daemon: DaemonProcess, speech20: np.ndarray) -> None:
    async def scenario() -> tuple[tuple[int, str] | None, str]:
        phone = Phone(daemon.port)
        await phone.open()
        await phone.send(speech20[: 2 * RATE])
        await phone.reset()
        thief = Phone(daemon.port, token=TOKENS[1])
        thief.resume_token = phone.resume_token
        await thief.resume()
        resumed = await phone.resume()  # the owner still can
        await phone.finish()
        return thief.close, resumed["type"]

    refused, resumed = asyncio.run(scenario())
    assert refused is not None and refused[0] == 4001
    assert resumed == "resumed"


def test_an_expired_token_is_refused_and_the_slot_is_free(synthetic_dir: Path, speech20: np.ndarray) -> None:
    proc = DaemonProcess("--model", str(synthetic_dir), "--dtype", "f32", "--max-sessions", "1",
                         "--resume-grace", "2")
    try:
        async def scenario() -> tuple[int, tuple[int, str] | None]:
            phone = Phone(proc.port, token="")
            await phone.open()
            await phone.send(speech20[: 2 * RATE])
            await phone.reset()
            await asyncio.sleep(0.5)
            waiting = json.loads(http_get(proc.port, "/readyz")[1])["free_slots"]  # still held
            await asyncio.sleep(3.5)  # 4 s after the drop: past the grace
            late = Phone(proc.port, token="")
            late.resume_token = phone.resume_token
            await late.resume()
            return waiting, late.close

        waiting, refused = asyncio.run(scenario())
        assert waiting == 0
        assert refused is not None and refused[0] == 4001 and "expired" in refused[1]
        assert json.loads(http_get(proc.port, "/readyz")[1])["free_slots"] == 1
        assert proc.events("session_expired")
        status = json.loads(http_get(proc.port, "/status")[1])
        assert status["resumable"] == {"waiting": 0, "resumed": 0, "expired": 1}
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def short_grace(synthetic_dir: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess("--model", str(synthetic_dir), "--dtype", "f32", "--max-sessions", "2",
                         "--resume-grace", "2")
    yield proc
    proc.stop()


async def resume_until_taken(phone: Phone) -> tuple[dict[str, Any], list[int]]:
    """Resume as the documented client does: after a 1013 (the old connection still finishing a
    long message), try again a moment later."""
    refusals: list[int] = []
    while True:
        resumed = await phone.resume()
        if resumed["type"] == "resumed":
            return resumed, refusals
        assert phone.close is not None and phone.close[0] == 1013, phone.close
        refusals.append(phone.close[0])
        await asyncio.sleep(0.5)


def test_a_resume_while_a_long_message_is_applied_keeps_the_session_past_the_grace(
        short_grace: DaemonProcess, speech20: np.ndarray) -> None:
    """The phone sends 16 s of audio in one message and its network drops at once; it resumes
    while the daemon still applies that message (taking over, or told 1013 until the message is
    applied). The session is its own again, and stays so past the old connection's grace."""
    big = np.resize(speech20, 16 * 8000)  # at 8 kHz: ~200 engine steps, seconds on this machine

    async def scenario() -> tuple[dict[str, Any], list[int], tuple[int, str] | None]:
        phone = Phone(short_grace.port, token="", rate=8000)
        await phone.open()
        assert phone.ws is not None
        await phone.ws.send(big.tobytes())
        await asyncio.sleep(0.2)  # it arrived; the daemon is applying it
        await phone.reset()
        resumed, refusals = await resume_until_taken(phone)
        assert phone.ws is not None
        await phone.ws.send(json.dumps({"type": "flush", "id": "all-applied"}))
        async with asyncio.timeout(120):  # the old connection has applied the whole message
            while not any(e["type"] == "flushed" for e in phone.events):
                await asyncio.sleep(0.1)
        await asyncio.sleep(3)  # past the 2 s grace of the connection that dropped
        await phone.finish()
        return resumed, refusals, phone.close

    resumed, refusals, close = asyncio.run(scenario())
    assert resumed["samples"] == len(big)  # the daemon took the whole message
    assert close == (1000, "end of audio: transcript complete")
    assert not short_grace.events("session_expired")
    assert not short_grace.events("session_failed")


def test_two_resumes_at_once_take_over_one_after_the_other(short_grace: DaemonProcess,
                                                          speech20: np.ndarray) -> None:
    """The phone's path changes twice in a row (Wi-Fi, then cellular): two resumes of one session
    race. One takes over from the other; the survivor finishes with the whole transcript."""

    async def scenario() -> tuple[int | None, list[tuple[int, str] | None], Phone]:
        phone = Phone(short_grace.port, token="")
        await phone.open()
        await phone.send(speech20[: 3 * RATE])
        await asyncio.sleep(0.5)
        old = phone.go_silent()
        twins = [Phone(short_grace.port, token="") for _ in range(2)]
        for twin in twins:
            twin.resume_token, twin.events = phone.resume_token, list(phone.events)
        results = await asyncio.gather(*(resume_until_taken(twin) for twin in twins))
        assert [r[0]["type"] for r in results] == ["resumed", "resumed"]
        await asyncio.sleep(1)
        losers = [twin for twin in twins if twin.close is not None]
        [survivor] = [twin for twin in twins if twin.close is None]
        await survivor.send(speech20[3 * RATE: 5 * RATE])
        await survivor.finish()
        old.transport.abort()
        return old.close_code, [loser.close for loser in losers], survivor

    old_code, losers, survivor = asyncio.run(scenario())
    assert [code for code, _ in filter(None, losers)] == [4002]
    assert survivor.close == (1000, "end of audio: transcript complete")
    assert [e["seq"] for e in survivor.events] == list(range(1, len(survivor.events) + 1))
    assert not short_grace.events("session_failed")
