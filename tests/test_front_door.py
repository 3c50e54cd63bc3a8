"""One front door: the file API and Wyoming drive the same in-process sessions as the WebSocket
paths, with the same guards: who may connect, idle timeouts, admission before work, release on
leave, draining on SIGTERM, the real peer in the log, and no socket of the daemon's own."""

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
import soxr
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_read_event, async_write_event
from wyoming.info import Describe

from pinguin_daemon.client import stream

from .daemon import DaemonProcess, http_get
from .test_wyoming_and_files import encode, free_port

TOKEN = "sk-door"
SLOTS = 2
IDLE_S = 2


@pytest.fixture(scope="module")
def daemon(synthetic_dir: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess("--model", str(synthetic_dir), "--dtype", "f32", "--max-sessions", str(SLOTS),
                         "--auth-tokens", TOKEN, "--http-port", str(free_port()),
                         "--wyoming-port", str(free_port()), "--wyoming-allow", "127.0.0.1",
                         "--idle-timeout", str(IDLE_S))
    yield proc
    proc.stop()


def ports(proc: DaemonProcess) -> dict[str, Any]:
    return proc.events("listening")[0]


def free_slots(proc: DaemonProcess) -> int:
    _, body = http_get(proc.port, "/readyz", {"Authorization": f"Bearer {TOKEN}"})
    return int(json.loads(body)["free_slots"])


def wait_until(predicate: Any, timeout: float) -> float:
    """Seconds until predicate() held (AssertionError after `timeout`)."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)
    return time.monotonic() - started


class Wyoming:
    """A Wyoming client from a chosen local address (wyoming's own event reader and writer)."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.port, self.source = port, source
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> Wyoming:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port,
                                                                 local_addr=(self.source, 0))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.writer is not None
        self.writer.close()

    async def send(self, event: Event) -> None:
        assert self.writer is not None
        await async_write_event(event, self.writer)

    async def read(self, timeout: float = 30) -> Event | None:
        assert self.reader is not None
        return await asyncio.wait_for(async_read_event(self.reader), timeout)

    async def until_end(self, timeout: float = 60) -> list[Event]:
        """Every event until the server closes the connection."""
        events = []
        try:
            while (event := await self.read(timeout)) is not None:
                events.append(event)
        except ConnectionResetError:
            pass  # closed with our bytes unread: the kernel resets instead of a clean end
        return events


def pcm16(samples: np.ndarray, rate: int = 16000) -> bytes:
    resampled = soxr.resample(samples, 24000, rate) if rate != 24000 else samples
    return (np.clip(resampled, -1, 1) * 32767).astype("<i2").tobytes()


async def send_audio(client: Wyoming, pcm: bytes, rate: int = 16000, width: int = 2, channels: int = 1,
                     realtime: bool = False) -> None:
    await client.send(AudioStart(rate=rate, width=width, channels=channels).event())
    step = rate // 10 * width * channels  # 100 ms chunks
    for start in range(0, len(pcm), step):
        await client.send(AudioChunk(rate=rate, width=width, channels=channels,
                                     audio=pcm[start:start + step]).event())
        await asyncio.sleep(0.1 if realtime else 0)


def test_wyoming_needs_an_allowed_address_when_tokens_are_set(daemon: DaemonProcess) -> None:
    async def scenario() -> tuple[list[Event], Event | None]:
        async with Wyoming(ports(daemon)["wyoming_port"], source="127.0.0.2") as stranger:
            await stranger.send(Describe().event())
            refused = await stranger.until_end()
        async with Wyoming(ports(daemon)["wyoming_port"]) as home_assistant:
            await home_assistant.send(Describe().event())
            return refused, await home_assistant.read()

    refused, info = asyncio.run(scenario())
    assert refused == []  # closed at once, before any event was read
    assert info is not None and info.type == "info"
    [line] = [r for r in daemon.wait_event("wyoming_refused") if r["peer"] == "127.0.0.2"]
    assert "wyoming_allow" in str(line["reason"])


def test_idle_wyoming_streams_are_ended_and_their_slots_freed(daemon: DaemonProcess,
                                                             speech_clips: list[np.ndarray]) -> None:
    async def scenario() -> tuple[list[list[Event]], str, int]:
        port = ports(daemon)["wyoming_port"]
        idle = [Wyoming(port), Wyoming(port)]
        for client in idle:
            await client.__aenter__()
            await client.send(AudioStart(rate=16000, width=2, channels=1).event())
            assert (await client.read()).type == "transcript-start"  # type: ignore[union-attr]
        assert free_slots(daemon) == 0  # both slots held by clients that send nothing
        ended = [await client.until_end(timeout=IDLE_S + 10) for client in idle]
        result = await stream(f"ws://127.0.0.1:{daemon.port}/ws?token={TOKEN}", speech_clips[0][:24000])
        for client in idle:
            await client.__aexit__()
        return ended, result.text, result.close_code or 0

    ended, text, code = asyncio.run(scenario())
    for events in ended:
        [error] = events
        assert Error.is_type(error.type)
        assert Error.from_event(error).code == "idle"
        assert Error.from_event(error).text == f"idle: nothing received for {IDLE_S} s"
    assert code == 1000 and text  # the token holder got a slot
    closed = [r for r in daemon.events("session_closed") if r["frontend"] == "wyoming" and r["code"] == 1008]
    assert len(closed) >= 2


def test_an_idle_websocket_is_closed_with_1008(daemon: DaemonProcess) -> None:
    async def scenario() -> tuple[int, str, list[dict[str, Any]]]:
        async with connect(f"ws://127.0.0.1:{daemon.port}/v2?token={TOKEN}") as ws:
            messages = []
            try:
                while True:
                    messages.append(json.loads(await asyncio.wait_for(ws.recv(), IDLE_S + 10)))
            except ConnectionClosed:
                pass
            assert ws.close_code is not None
            return ws.close_code, ws.close_reason or "", messages

    code, reason, messages = asyncio.run(scenario())
    assert (code, reason) == (1008, f"idle: nothing received for {IDLE_S} s")
    assert {"type": "error", "code": "idle", "message": reason} in messages


def multipart(data: bytes, fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = "pinguin-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                 f"Content-Type: audio/wav\r\n\r\n".encode() + data + f"\r\n--{boundary}--\r\n".encode())
    return b"".join(parts), boundary


def post_head(port: int, body_length: int, boundary: str) -> bytes:
    return (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {body_length}\r\n\r\n").encode()


def test_an_upload_cut_midway_frees_its_slot_within_a_second(daemon: DaemonProcess,
                                                              speech_clips: list[np.ndarray]) -> None:
    port = ports(daemon)["http_port"]
    body, boundary = multipart(encode(speech_clips[0], "wav", "pcm_s16le"), {"model": "m"})
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(post_head(port, len(body), boundary) + body[: len(body) // 2])
        wait_until(lambda: free_slots(daemon) == SLOTS - 1, 10)  # the slot is taken before the body
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    assert wait_until(lambda: free_slots(daemon) == SLOTS, 5) < 1.0


def test_a_client_that_leaves_mid_transcription_frees_its_slot(daemon: DaemonProcess,
                                                              speech_clips: list[np.ndarray]) -> None:
    port = ports(daemon)["http_port"]
    long = np.tile(speech_clips[1], 6)  # ~20 s: many engine steps, well past the moment it leaves
    body, boundary = multipart(encode(long, "flac", "flac"), {"model": "m"})
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(post_head(port, len(body), boundary) + body)
        wait_until(lambda: free_slots(daemon) == SLOTS - 1, 10)
    assert wait_until(lambda: free_slots(daemon) == SLOTS, 5) < 1.0
    closed = [r for r in daemon.events("session_closed")
              if r["frontend"] == "files" and r["code"] == 1006][-1]
    assert float(closed["audio_s"]) < len(long) / 24000  # it stopped before the end of the file


def test_busy_wyoming_gets_an_error_and_the_connection_ends(daemon: DaemonProcess) -> None:
    async def scenario() -> list[Event]:
        holders = [await connect(f"ws://127.0.0.1:{daemon.port}/ws?token={TOKEN}") for _ in range(SLOTS)]
        try:
            async with Wyoming(ports(daemon)["wyoming_port"]) as client:
                await client.send(Transcribe(language="en").event())
                await client.send(AudioStart(rate=16000, width=2, channels=1).event())
                return await client.until_end()
        finally:
            for ws in holders:
                await ws.close()

    [event] = asyncio.run(scenario())
    assert Error.is_type(event.type) and Error.from_event(event).code == "busy"


@pytest.mark.parametrize(("events", "code"), [
    ([Transcribe(language="de").event()], "unsupported_language"),
    ([AudioStart(rate=16000, width=3, channels=1).event()], "bad_audio"),
    ([AudioStart(rate=16000, width=2, channels=1).event(),
      AudioChunk(rate=16000, width=2, channels=1, audio=b"\x00" * 3).event()], "bad_audio"),
])
def test_wyoming_failures_are_an_error_then_the_end(daemon: DaemonProcess, events: list[Event],
                                                     code: str) -> None:
    async def scenario() -> list[Event]:
        async with Wyoming(ports(daemon)["wyoming_port"]) as client:
            for event in events:
                await client.send(event)
            return [e for e in await client.until_end() if not TranscriptStart.is_type(e.type)]

    [event] = asyncio.run(scenario())
    assert Error.is_type(event.type) and Error.from_event(event).code == code


def test_wyoming_streams_one_after_another_and_stop_without_start(daemon: DaemonProcess,
                                                                   speech_clips: list[np.ndarray]) -> None:
    """A stop without a start is an empty transcript; a second audio-start ends the first stream
    with its transcript; four channels are one signal, not four times the audio."""
    clip = speech_clips[2][:48000]
    quad = np.repeat(np.frombuffer(pcm16(clip), "<i2")[:, None], 4, axis=1).tobytes()

    async def scenario() -> tuple[list[Event], list[Event]]:
        async with Wyoming(ports(daemon)["wyoming_port"]) as client:
            await client.send(Transcribe(language="en-US").event())
            await client.send(AudioStop().event())
            first = [await client.read(), await client.read()]
            await send_audio(client, pcm16(clip))
            await send_audio(client, quad, channels=4)  # a new stream: the first one ends here
            await client.send(AudioStop().event())
            rest = []
            while True:
                event = await client.read()
                assert event is not None
                rest.append(event)
                if len([e for e in rest if TranscriptStop.is_type(e.type)]) == 2:
                    return first, rest

    first, rest = asyncio.run(scenario())
    assert [e.type for e in first] == ["transcript", "transcript-stop"]
    assert Transcript.from_event(first[0]).text == ""
    transcripts = [Transcript.from_event(e).text for e in rest if Transcript.is_type(e.type)]
    assert len(transcripts) == 2 and transcripts[0] == transcripts[1] != ""  # the same audio twice
    closed = [r for r in daemon.events("session_closed") if r["frontend"] == "wyoming" and r["code"] == 1000]
    assert {round(float(r["audio_s"]), 1) for r in closed[-2:]} == {round(len(clip) / 24000, 1)}


def daemon_sockets(pid: int) -> list[tuple[str, str]]:
    """(local, remote) of every TCP socket of the process, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    pairs = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                pairs.append((fields[1], fields[2]))
    return pairs


def test_file_and_wyoming_sessions_log_the_real_peer_and_never_loop_back(
        daemon: DaemonProcess, speech_clips: list[np.ndarray]) -> None:
    import openai

    clip = speech_clips[3]

    async def wyoming_from(source: str) -> list[Event]:
        async with Wyoming(ports(daemon)["wyoming_port"], source=source) as client:
            await client.send(Transcribe(language="fr").event())
            await send_audio(client, pcm16(clip), realtime=True)
            await client.send(AudioStop().event())
            events = []
            while (event := await client.read()) is not None:
                events.append(event)
                if TranscriptStop.is_type(event.type):
                    return events
            return events

    async def scenario() -> tuple[list[Event], str, list[tuple[str, str]]]:
        files = openai.AsyncOpenAI(api_key=TOKEN, base_url=f"http://127.0.0.1:{ports(daemon)['http_port']}/v1")
        upload = asyncio.create_task(files.audio.transcriptions.create(
            model="m", file=("memo.flac", encode(np.tile(clip, 3), "flac", "flac"))))
        wyoming = asyncio.create_task(wyoming_from("127.0.0.1"))
        await asyncio.sleep(1.5)  # both are being transcribed now
        sockets = daemon_sockets(daemon.proc.pid)
        return await wyoming, (await upload).text, sockets

    events, file_text, sockets = asyncio.run(scenario())
    assert any(TranscriptChunk.is_type(e.type) for e in events) and file_text
    local = {pair[0] for pair in sockets}
    assert not [pair for pair in sockets if pair[1] in local]  # no socket of ours talks to another
    opened = {r["frontend"]: r for r in daemon.events("session_opened")}
    assert opened["wyoming"]["peer"] == "127.0.0.1" and opened["files"]["peer"] == "127.0.0.1"


def test_sigterm_finishes_a_wyoming_stream_with_its_transcript(synthetic_dir: Path,
                                                               speech_clips: list[np.ndarray]) -> None:
    wyoming_port = free_port()
    proc = DaemonProcess("--model", str(synthetic_dir), "--dtype", "f32", "--max-sessions", "1",
                         "--wyoming-port", str(wyoming_port))
    try:
        async def scenario() -> list[Event]:
            async with Wyoming(wyoming_port, source="127.0.0.3") as client:
                await client.send(Transcribe().event())
                sender = asyncio.create_task(send_audio(client, pcm16(speech_clips[0]), realtime=True))
                await asyncio.sleep(2.0)
                proc.proc.send_signal(15)
                events = await client.until_end()
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
                return events

        events = asyncio.run(scenario())
        assert proc.proc.wait(60) == 0
        kinds = [e.type for e in events]
        assert kinds[0] == "transcript-start" and kinds[-2:] == ["transcript", "transcript-stop"]
        chunks = "".join(TranscriptChunk.from_event(e).text for e in events
                         if TranscriptChunk.is_type(e.type))
        assert Transcript.from_event(events[-2]).text == chunks.strip() != ""
        [closed] = proc.events("session_closed")
        assert (closed["frontend"], closed["peer"], closed["code"]) == ("wyoming", "127.0.0.3", 1001)
    finally:
        proc.stop()
