"""Operations: /metrics counters, a crash (SIGKILL) under a supervisor, wss:// with TLS."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from pinguin_daemon.bench.latency import scrape as scrape_metrics
from pinguin_daemon.client import stream
from pinguin_daemon.engine.reference import fresh_reference_model
from pinguin_daemon.model import loader, store
from pinguin_daemon.server.session import FLUSH_EXTRA_FRAMES

from .daemon import DaemonProcess, reference_text


def scrape(port: int) -> dict[str, float]:
    return scrape_metrics(f"http://127.0.0.1:{port}")


def test_metrics_count_what_happened(synthetic_dir: Path, speech_clips: list[np.ndarray]) -> None:
    proc = DaemonProcess("--model", str(synthetic_dir), "--dtype", "f32", "--max-sessions", "1")
    try:
        before = scrape(proc.port)
        assert before["pinguin_free_slots"] == 1 and before["pinguin_model_load_seconds"] > 0

        async def scenario() -> tuple[int, int]:
            done = await stream(proc.url, speech_clips[0])
            async with connect(proc.url):  # holds the only slot
                async with connect(proc.url) as extra:
                    try:
                        await extra.recv()
                    except ConnectionClosed as exc:
                        refused = exc.rcvd.code if exc.rcvd else 0
                during = scrape(proc.port)
                assert during["pinguin_sessions_open"] == 1 and during["pinguin_free_slots"] == 0
            return int(done.close_code or 0), refused

        code, refused = asyncio.run(scenario())
        assert (code, refused) == (1000, 1013)
        proc.wait_event("session_closed", count=2)
        after = scrape(proc.port)
        frames = -(-len(speech_clips[0]) // 1920) + 6 + FLUSH_EXTRA_FRAMES
        assert after['pinguin_sessions_opened_total{endpoint="/ws"}'] == 2
        assert after["pinguin_sessions_refused_total"] == 1
        # One ended with end-of-audio, the other closed by its client with 1000 too.
        assert after['pinguin_sessions_closed_total{code="1000"}'] == 2
        assert after["pinguin_audio_frames_total"] == frames
        assert after["pinguin_engine_step_seconds_count"] == frames
        assert after["pinguin_sessions_open"] == 0 and after["pinguin_free_slots"] == 1
        assert after["pinguin_messages_in_total"] > 10 and after["pinguin_messages_out_total"] >= 1
    finally:
        proc.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sigkill_drops_clients_and_a_supervisor_restarts(synthetic_dir: Path,
                                                         speech_clips: list[np.ndarray]) -> None:
    port = free_port()
    args = ("--model", str(synthetic_dir), "--dtype", "f32", "--max-sessions", "2", "--port", str(port))
    restarts: list[DaemonProcess] = []
    stop = threading.Event()
    first = DaemonProcess(*args)
    restarts.append(first)

    def supervisor() -> None:  # what launchd's KeepAlive / systemd's Restart=on-failure do
        current = first
        while not stop.is_set():
            if current.proc.poll() is not None and current.proc.returncode != 0:
                time.sleep(1)  # the restart interval
                current = DaemonProcess(*args)
                restarts.append(current)
            time.sleep(0.1)

    threading.Thread(target=supervisor, daemon=True).start()
    try:
        async def client() -> tuple[float, int | None]:
            killed = 0.0
            ws = await connect(first.url)
            try:
                for i in range(0, 10 * len(speech_clips[0]), 2400):
                    await ws.send(np.resize(speech_clips[0], i + 2400)[i:].tobytes())
                    await asyncio.sleep(0.02)
                    if i == 24000:
                        first.proc.kill()
                        killed = time.monotonic()
                await asyncio.wait_for(ws.recv(), 30)
            except ConnectionClosed as exc:
                return time.monotonic() - killed, exc.rcvd.code if exc.rcvd else None
            raise AssertionError("connection did not drop")

        dropped_after, code = asyncio.run(client())
        assert code is None  # no close frame: the process died
        assert dropped_after < 10  # the client noticed, no hang
        deadline = time.monotonic() + 120
        while len(restarts) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(restarts) == 2
        result = asyncio.run(stream(restarts[1].url, speech_clips[1]))
        assert result.close_code == 1000 and result.text
    finally:
        stop.set()
        for proc in restarts:
            proc.stop()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


def test_wss_with_a_self_signed_certificate(synthetic_dir: Path, speech_clips: list[np.ndarray],
                                            certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    proc = DaemonProcess("--model", str(synthetic_dir), "--dtype", "f32", "--max-sessions", "1",
                         "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        context = ssl.create_default_context(cafile=str(cert))

        async def go() -> tuple[str, int | None]:
            text = []
            async with connect(f"wss://127.0.0.1:{proc.port}/ws", ssl=context) as ws:
                for i in range(0, len(speech_clips[3]), 2400):
                    await ws.send(speech_clips[3][i:i + 2400].tobytes())
                await ws.send(b"")
                try:
                    async for message in ws:
                        text.append(str(message))
                except ConnectionClosed:
                    pass
                return "".join(text), ws.close_code

        text, code = asyncio.run(go())
        ref = fresh_reference_model(loader.load_model(store.files_in_directory(synthetic_dir, "none"), "f32"))
        assert code == 1000 and text == reference_text(ref, speech_clips[3])
        assert any("wss://" in str(r.get("urls")) for r in proc.events("listening"))
    finally:
        proc.stop()


def test_tls_settings_are_checked(synthetic_dir: Path, tmp_path: Path) -> None:
    import sys

    proc = subprocess.run([sys.executable, "-m", "pinguin_daemon", "serve", "--model", str(synthetic_dir),
                           "--port", "0", "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key",
                           str(tmp_path / "missing.key")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "setting 'tls_cert' names" in proc.stderr and "does not exist" in proc.stderr
