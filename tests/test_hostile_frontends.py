"""Every front end survives hostile input: uploads that claim more than they hold or are no
recording at all, unbounded Wyoming events, floods of markers, idle sockets by the hundred, web
pages from elsewhere, undecodable headers. Each was reproduced on the daemon before the fix."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import struct
import time
import urllib.request
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from wyoming.error import Error
from wyoming.event import Event, async_read_event

from pinguin_daemon.client import stream

from .daemon import DaemonProcess, http_get
from .test_wyoming_and_files import free_port


@pytest.fixture(scope="module")
def daemon(synthetic_dir: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess("--model", str(synthetic_dir), "--dtype", "f32", "--max-sessions", "3",
                         "--http-port", str(free_port()), "--wyoming-port", str(free_port()),
                         "--allowed-origins", "https://allowed.example")
    yield proc
    proc.stop()


def ports(proc: DaemonProcess) -> dict[str, Any]:
    return proc.events("listening")[0]


def rss_mb(proc: DaemonProcess) -> float:
    for line in Path(f"/proc/{proc.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class HealthWatch:
    """Asks /healthz every 50 ms in a thread while an attack runs; the slowest answer."""

    def __init__(self, port: int) -> None:
        import threading

        self.port, self.worst, self.failures = port, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                status, _ = http_get(self.port, "/healthz")
                assert status == 200
            except Exception:  # noqa: BLE001 - counted: the test asserts there are none
                self.failures += 1
            self.worst = max(self.worst, time.monotonic() - started)
            self._stop.wait(0.05)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def upload(proc: DaemonProcess, data: bytes, name: str = "a.wav") -> tuple[int, dict[str, Any]]:
    boundary = "hostile-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n\r\n'
            ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"http://127.0.0.1:{ports(proc)['http_port']}/v1/audio/transcriptions",
                                     data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def one_hz_wav() -> bytes:
    """1,044 bytes whose header says 1 Hz: 1,000 s of audio at 1 Hz, 24 million samples at 24 kHz."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(1)
        out.setframerate(1)
        out.writeframes(bytes(range(256)) * 3 + bytes(232))
    return buf.getvalue()


def test_a_wav_that_claims_one_hertz_is_refused_without_decoding(daemon: DaemonProcess) -> None:
    data = one_hz_wav()
    assert len(data) == 1044
    before = rss_mb(daemon)
    status, body = upload(daemon, data)
    assert status == 400 and "1 Hz" in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"
    assert rss_mb(daemon) - before < 100


def own_udp_sockets(pid: int) -> int:
    inodes = {fd.readlink().name[8:-1] for fd in Path(f"/proc/{pid}/fd").iterdir()
              if fd.is_symlink() and fd.readlink().name.startswith("socket:[")}
    count = 0
    for table in ("udp", "udp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            count += line.split()[9] in inodes
    return count


@pytest.mark.parametrize(("name", "data"), [
    ("stream.sdp", b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=attack\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
                   b"m=audio 15300 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"),
    ("list.ffconcat", b"ffconcat version 1.0\nfile 'pyproject.toml'\nfile '/etc/passwd'\n"),
    ("list.m3u8", b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nhttp://127.0.0.1:9/a.ts\n"),
])
def test_network_and_playlist_formats_are_never_opened(daemon: DaemonProcess, name: str, data: bytes) -> None:
    udp_before = own_udp_sockets(daemon.proc.pid)
    status, body = upload(daemon, data, name)
    assert status == 400 and "not an audio recording" in body["error"]["message"]
    assert own_udp_sockets(daemon.proc.pid) == udp_before  # no RTP port opened for the file


def test_decoding_stops_at_max_upload_seconds(synthetic_dir: Path) -> None:
    proc = DaemonProcess("--model", str(synthetic_dir), "--dtype", "f32", "--http-port", str(free_port()),
                         "--max-upload-seconds", "2")
    try:
        buf = io.BytesIO()
        with wave.open(buf, "wb") as out:  # 30 s of 8 kHz silence, its header honest
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(8000)
            out.writeframes(bytes(2 * 8000 * 30))
        status, body = upload(proc, buf.getvalue())
        assert status == 413 and body["error"]["code"] == "audio_too_long"
        # A header that understates: a WAV whose data size field says 1 s but holds 30 s.
        raw = bytearray(buf.getvalue())
        struct.pack_into("<I", raw, 40, 2 * 8000)
        status, body = upload(proc, bytes(raw))
        assert status in (200, 413)  # FFmpeg either trusts the header (1 s) or decodes on
        if status == 413:
            assert body["error"]["code"] == "audio_too_long"
        [closed] = [r for r in proc.events("session_closed") if r["code"] == 1007][:1]
        assert float(closed["audio_s"]) <= 2.5  # never more audio than the limit went in
    finally:
        proc.stop()


async def wyoming_raw(port: int, data: bytes, read_for: float = 30) -> list[Event]:
    """Send raw bytes to the Wyoming port; every event until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    events = []
    try:
        async with asyncio.timeout(read_for):
            while (event := await async_read_event(reader)) is not None:
                events.append(event)
    finally:
        writer.close()
    return events


def header(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode() + b"\n"


def test_a_wyoming_payload_of_4_gb_is_refused_before_it_is_read(daemon: DaemonProcess) -> None:
    before = rss_mb(daemon)

    async def attack() -> list[Event]:
        reader, writer = await asyncio.open_connection("127.0.0.1", ports(daemon)["wyoming_port"])
        writer.write(header({"type": "audio-chunk", "data": {"rate": 16000, "width": 2, "channels": 1},
                             "payload_length": 4294967296}))
        events: list[Event] = []
        try:
            for _ in range(50):  # keep sending payload bytes: the server must close, not read them
                writer.write(bytes(1 << 20))
                await writer.drain()
                await asyncio.sleep(0.01)
        except ConnectionError:
            pass
        try:
            while (event := await asyncio.wait_for(async_read_event(reader), 10)) is not None:
                events.append(event)
        except ConnectionResetError:
            pass
        writer.close()
        return events

    with HealthWatch(daemon.port) as health:
        events = asyncio.run(attack())
    [error] = events
    assert Error.from_event(error).code == "too_big" and "payload_length" in Error.from_event(error).text
    assert rss_mb(daemon) - before < 50
    assert health.failures == 0 and health.worst < 0.2


def test_a_wyoming_chunk_at_one_hertz_is_refused_without_converting_it(daemon: DaemonProcess) -> None:
    chunk = header({"type": "audio-chunk", "data": {"rate": 1, "width": 2, "channels": 1},
                    "payload_length": 48 * 1024}) + bytes(48 * 1024)
    before = rss_mb(daemon)
    with HealthWatch(daemon.port) as health:
        events = asyncio.run(wyoming_raw(ports(daemon)["wyoming_port"], header(
            {"type": "audio-start", "data": {"rate": 16000, "width": 2, "channels": 1}}) + chunk))
    kinds = [e.type for e in events]
    assert kinds == ["transcript-start", "error"]
    assert Error.from_event(events[-1]).code == "bad_audio" and "1 Hz" in Error.from_event(events[-1]).text
    assert rss_mb(daemon) - before < 50
    assert health.failures == 0 and health.worst < 0.2


@pytest.mark.parametrize(("data", "code"), [
    (b"[1, 2, 3]\n", "bad_event"),
    (b'{"data": {}}\n', "bad_event"),
    (b'{"type": "audio-chunk", "payload_length": "12"}\n', "bad_event"),
    (b'{"type": "describe", "data_length": -1}\n', "bad_event"),
    (b"not json at all\n", "bad_event"),
    (b'{"type": "x", "data": {"a": "' + b"y" * 70000 + b'"}}\n', "too_big"),
    (b'{"type": "describe", "data_length": 100000}\n', "too_big"),
])
def test_malformed_wyoming_headers_are_an_error_never_a_crash(daemon: DaemonProcess, data: bytes,
                                                               code: str) -> None:
    events = asyncio.run(wyoming_raw(ports(daemon)["wyoming_port"], data))
    [error] = events
    assert Error.is_type(error.type) and Error.from_event(error).code == code
    assert not [line for line in daemon.raw if "Task exception was never retrieved" in line]


def test_a_flood_of_markers_is_closed_with_1008(daemon: DaemonProcess) -> None:
    async def flood() -> tuple[int, str]:
        async with connect(f"ws://127.0.0.1:{daemon.port}/api/asr-streaming") as ws:
            assert msgpack.unpackb(await ws.recv())["type"] == "Ready"
            try:
                for i in range(400_000):  # no audio: none of them can be answered
                    await ws.send(msgpack.packb({"type": "Marker", "id": i}))
            except ConnectionClosed:
                pass
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 30)
            except ConnectionClosed:
                pass
            assert ws.close_code is not None
            return ws.close_code, ws.close_reason or ""

    with HealthWatch(daemon.port) as health:
        code, reason = asyncio.run(flood())
    assert code == 1008 and reason.startswith("too many markers: 1000 wait")
    assert health.failures == 0 and health.worst < 0.2


def test_hundreds_of_idle_sockets_leave_the_daemon_serving(synthetic_dir: Path,
                                                            speech_clips: list[np.ndarray]) -> None:
    """300 idle sockets on each side port, under launchd's default soft limit of 256 descriptors:
    the daemon raised it, capped the side ports, and still answers and admits on the main port."""
    wyoming_port, http_port = free_port(), free_port()
    proc = DaemonProcess("--model", str(synthetic_dir), "--dtype", "f32", "--http-port", str(http_port),
                         "--wyoming-port", str(wyoming_port), prefix=("prlimit", "--nofile=256:4096"))
    idle: list[socket.socket] = []
    try:
        assert int(ports(proc)["nofile"]) == 4096  # raised to the hard limit
        for port in (wyoming_port, http_port):
            for _ in range(300):
                idle.append(socket.create_connection(("127.0.0.1", port)))
        time.sleep(0.5)
        status, _ = http_get(proc.port, "/healthz")
        result = asyncio.run(stream(proc.url, speech_clips[0][:24000]))
        assert status == 200 and result.close_code == 1000 and result.text
        turned_away = 0
        for sock in idle:  # past the side ports' share, connections were closed at once
            sock.setblocking(False)
            try:
                turned_away += sock.recv(1) == b""
            except BlockingIOError:
                pass  # still open (until it has been silent for 10 s)
            except ConnectionResetError:
                turned_away += 1
        assert turned_away >= 600 - (512 - 64)
        assert proc.events("connection_refused")
    finally:
        for sock in idle:
            sock.close()
        proc.stop()


def test_idle_side_port_connections_are_closed_after_10_s(daemon: DaemonProcess) -> None:
    with socket.create_connection(("127.0.0.1", ports(daemon)["wyoming_port"])) as quiet:
        quiet.settimeout(30)
        started = time.monotonic()
        assert quiet.recv(1) == b""
        assert 9 <= time.monotonic() - started < 20


def test_web_pages_from_elsewhere_are_refused(daemon: DaemonProcess) -> None:
    url = f"ws://127.0.0.1:{daemon.port}/v2"

    async def handshake(origin: str | None) -> int:
        try:
            async with connect(url, origin=origin) as ws:  # type: ignore[arg-type]
                assert json.loads(await ws.recv())["type"] == "ready"
                return 101
        except InvalidStatus as exc:
            return exc.response.status_code

    assert asyncio.run(handshake("https://evil.example")) == 403
    assert asyncio.run(handshake(None)) == 101  # apps, SDKs, Home Assistant
    assert asyncio.run(handshake(f"http://127.0.0.1:{daemon.port}")) == 101  # the daemon's own page
    assert asyncio.run(handshake("https://allowed.example")) == 101
    assert daemon.events("origin_refused")


def raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data:
                break
        return data


@pytest.mark.parametrize("path", ["/v2", "/metrics", "/v1/audio/transcriptions"])
def test_undecodable_header_bytes_are_a_client_error(synthetic_dir: Path, path: str) -> None:
    proc = DaemonProcess("--model", str(synthetic_dir), "--dtype", "f32", "--http-port", str(free_port()),
                         "--auth-tokens", "sk-x")
    try:
        port = ports(proc)["http_port"] if path.startswith("/v1") else proc.port
        method = b"POST" if path.startswith("/v1") else b"GET"
        upgrade = (b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                   b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n") if path == "/v2" else b""
        answer = raw_request(port, method + b" " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + upgrade
                             + b"Authorization: Bearer \xff\r\nContent-Length: 0\r\n\r\n")
        status = int(answer.split()[1])
        assert status in (400, 401), answer[:200]
        assert not [line for line in proc.raw if "Traceback" in line or '"exception"' in line]
    finally:
        proc.stop()
