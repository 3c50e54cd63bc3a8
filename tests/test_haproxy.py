"""More than one machine: Debian's HAProxy, with the shipped deploy/haproxy.cfg, in front of two
daemons on 127.0.0.1. Sessions spread over both; a daemon that is full, or draining after
SIGTERM, gets no new session; every session ends with 1000 or 1001, none is refused or cut."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .daemon import DaemonProcess, http_get

REPO = Path(__file__).resolve().parent.parent
SLOTS = 2

if shutil.which("haproxy") is None and not os.environ.get("CI"):
    pytest.skip("haproxy is not installed (apt-get install haproxy; .ci/run installs it)",
                allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proxy_config(listen: int, backends: list[int]) -> str:
    """deploy/haproxy.cfg as shipped, with its bind port and server lines pointed at the test's."""
    text = (REPO / "deploy" / "haproxy.cfg").read_text()
    text = text.replace("bind :8000", f"bind 127.0.0.1:{listen}")
    text = text.replace("log stdout format raw local0 info", "log stderr format raw local0 info")
    servers = [line for line in text.splitlines() if re.match(r"\s+server ", line)]
    assert len(servers) == 2
    for line, port in zip(servers, backends, strict=True):
        text = text.replace(line, re.sub(r"server (\S+) \S+ (.*)maxconn \d+",
                                         rf"server \1 127.0.0.1:{port} \2maxconn {SLOTS}", line))
    return text


@pytest.fixture(scope="module")
def cluster(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    daemons = [DaemonProcess("--model", str(synthetic_dir), "--dtype", "f32", "--max-sessions", str(SLOTS))
               for _ in range(2)]
    listen = free_port()
    workdir = tmp_path_factory.mktemp("haproxy")
    cfg = workdir / "haproxy.cfg"
    cfg.write_text(proxy_config(listen, [d.port for d in daemons]))
    check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    # The shipped config logs to stdout; the copy logs to stderr, kept here for the log test.
    log = workdir / "haproxy.log"
    with log.open("wb") as log_file:
        proxy = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                 stderr=log_file)
    try:
        deadline = time.monotonic() + 30
        while True:  # up once both servers passed their health checks
            try:
                if http_get(listen, "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "haproxy never served /readyz"
            time.sleep(0.2)
        time.sleep(1.5)  # a passed check (inter 1 s, rise 1): both daemons in the rotation
        yield {"daemons": daemons, "port": listen, "log": log}
    finally:
        proxy.terminate()
        proxy.wait(10)
        for d in daemons:
            d.stop()


async def open_session(port: int) -> ClientConnection:
    """A /v2 session through the proxy, admitted (its `ready` received)."""
    ws = await connect(f"ws://127.0.0.1:{port}/v2", open_timeout=30)
    first = json.loads(await asyncio.wait_for(ws.recv(), 30))
    assert first["type"] == "ready", first
    return ws


async def finish(ws: ClientConnection, seconds: float = 0.5) -> tuple[int, list[dict[str, Any]]]:
    """Send some audio, then `finish`; the close code and every message."""
    await ws.send((np.sin(np.arange(int(24000 * seconds)) / 9) * 0.2).astype("<f4").tobytes())
    await ws.send(json.dumps({"type": "finish"}))
    received = []
    try:
        async for message in ws:
            received.append(json.loads(message))
    except ConnectionClosed:
        pass
    assert ws.close_code is not None
    return ws.close_code, received


def opened(d: DaemonProcess) -> int:
    return len(d.events("session_opened"))


async def opened_since(before: list[int], daemons: list[DaemonProcess], total: int) -> list[int]:
    """Sessions each daemon logged as opened since `before`, once `total` have been logged
    (the log lines arrive through a pipe, a moment after the clients' `ready`)."""
    deadline = time.monotonic() + 10
    while True:
        counts = [opened(d) - b for d, b in zip(daemons, before, strict=True)]
        if sum(counts) >= total or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.05)


async def admitted_or_503(port: int) -> ClientConnection | None:
    """A session through the proxy: the connection once admitted, or None for HAProxy's own 503
    (every daemon out of the rotation). A daemon's 1013 fails the test."""
    try:
        return await open_session(port)
    except InvalidStatus as exc:
        assert exc.response.status_code == 503, exc
        return None


def test_sessions_spread_and_a_full_daemon_gets_none(cluster: dict[str, Any]) -> None:
    a, b = cluster["daemons"]
    port = cluster["port"]

    async def scenario() -> None:
        before = [opened(a), opened(b)]
        sessions = [await open_session(port) for _ in range(2 * SLOTS)]
        try:
            # leastconn with maxconn = max_sessions: both daemons full, two sessions each.
            assert await opened_since(before, [a, b], 2 * SLOTS) == [SLOTS, SLOTS]
            for d in (a, b):
                status, body = http_get(d.port, "/readyz")
                assert status == 503 and json.loads(body)["full"] is True
            await asyncio.sleep(1.5)  # a check (every 1 s) has taken both out of the rotation
            assert await admitted_or_503(port) is None  # HAProxy says so itself: no daemon's 1013
            code, _ = await finish(sessions.pop(0))
            assert code == 1000
            # The daemon with a free slot is back after its next check; the new session goes there.
            for _ in range(50):
                newcomer = await admitted_or_503(port)
                if newcomer is not None:
                    sessions.append(newcomer)
                    break
                await asyncio.sleep(0.2)
            else:
                raise AssertionError("the daemon with a free slot never came back")
            for ws in sessions:
                assert (await finish(ws))[0] == 1000
        finally:
            for ws in sessions:
                await ws.close()

    asyncio.run(scenario())
    assert not a.events("session_refused") and not b.events("session_refused")


def test_a_daemon_filled_directly_leaves_the_rotation(cluster: dict[str, Any]) -> None:
    """Sessions HAProxy does not know about (clients connected to the daemon directly): the
    daemon's /readyz says it is full and HAProxy stops sending it sessions."""
    a, b = cluster["daemons"]
    port = cluster["port"]

    async def scenario() -> None:
        await asyncio.sleep(1.5)  # both back in the rotation after the previous test
        direct = [await open_session(a.port) for _ in range(SLOTS)]
        via_proxy: list[ClientConnection] = []
        try:
            await asyncio.sleep(1.5)  # a failed check (inter 1 s, fall 1) takes it out
            before = [opened(a), opened(b)]
            via_proxy = [await open_session(port) for _ in range(SLOTS)]
            assert await opened_since(before, [a, b], SLOTS) == [0, SLOTS]
            for ws in direct + via_proxy:
                assert (await finish(ws))[0] == 1000
        finally:
            for ws in direct + via_proxy:
                await ws.close()

    asyncio.run(scenario())
    assert not a.events("session_refused") and not b.events("session_refused")


def test_a_draining_daemon_finishes_its_sessions_and_gets_no_new_one(cluster: dict[str, Any]) -> None:
    a, b = cluster["daemons"]
    port = cluster["port"]

    async def stream_until_closed(ws: ClientConnection) -> tuple[int, str, int]:
        """Speak in real time until the server closes; close code, reason, words received."""
        words = 0

        async def reader() -> None:
            nonlocal words
            try:
                async for message in ws:
                    words += json.loads(message)["type"] == "word"
            except ConnectionClosed:
                pass

        task = asyncio.create_task(reader())
        chunk = (np.sin(np.arange(1920) / 7) * 0.2).astype("<f4").tobytes()
        try:
            for _ in range(300):
                await ws.send(chunk)
                await asyncio.sleep(0.08)
        except ConnectionClosed:
            pass
        await task
        assert ws.close_code is not None
        return ws.close_code, ws.close_reason or "", words

    async def scenario() -> None:
        await asyncio.sleep(1.5)  # everyone back in the rotation after the previous test
        before = [opened(a), opened(b)]
        sessions = [await open_session(port) for _ in range(2)]
        assert await opened_since(before, [a, b], 2) == [1, 1]  # leastconn: one each
        streams = [asyncio.create_task(stream_until_closed(ws)) for ws in sessions]
        await asyncio.sleep(1.5)
        b.proc.send_signal(15)
        await asyncio.sleep(0.3)
        # New sessions while B drains all go to A (B's listener is closed: redispatched).
        before = [opened(a), opened(b)]
        newcomer = await open_session(port)
        assert await opened_since(before, [a, b], 1) == [1, 0]
        assert b.proc.wait(30) == 0
        # A's streaming session is untouched; B's ended cleanly with its last words.
        results = []
        for ws in sessions:
            try:  # A's session; B's may be closing with its 1001 right now
                await ws.send(json.dumps({"type": "finish"}))
            except ConnectionClosed:
                pass
        for task in streams:
            results.append(await task)
        codes = sorted(r[0] for r in results)
        assert codes == [1000, 1001], results
        drained = next(r for r in results if r[0] == 1001)
        assert drained[1].startswith("server shutting down; transcribed the first ")
        assert (await finish(newcomer))[0] == 1000

    asyncio.run(scenario())
    assert not a.events("session_refused")


def test_the_log_holds_no_token(cluster: dict[str, Any]) -> None:
    """A token in the query string (how the status page reaches /v2) or in a header reaches the
    daemon but not HAProxy's log, which still says who asked for what."""
    port, log = cluster["port"], cluster["log"]
    secret = "s3cret-" + os.urandom(6).hex()

    async def websocket_with_token() -> None:
        ws = await connect(f"ws://127.0.0.1:{port}/v2?token={secret}-query", open_timeout=30,
                           additional_headers={"Authorization": f"Bearer {secret}-bearer",
                                               "kyutai-api-key": f"{secret}-key"})
        assert json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "ready"
        await ws.close()

    deadline = time.monotonic() + 10
    while http_get(port, "/readyz")[0] != 200:  # a daemon back in the rotation after the last test
        assert time.monotonic() < deadline, "no daemon came back into the rotation"
        time.sleep(0.2)
    status, _ = http_get(port, f"/healthz?token={secret}-healthz&x=1",
                         {"Authorization": f"Bearer {secret}-bearer"})
    assert status == 200
    asyncio.run(websocket_with_token())
    deadline = time.monotonic() + 10
    while True:  # HAProxy logs a request when it ends; the WebSocket's once its tunnel closes
        lines = log.read_text(errors="replace").splitlines()
        if any("/healthz" in line for line in lines) and any("/v2" in line for line in lines):
            break
        assert time.monotonic() < deadline, "HAProxy logged no request line:\n" + "\n".join(lines)
        time.sleep(0.1)
    text = "\n".join(lines)
    assert secret not in text, text
    assert "token=" not in text and "x=1" not in text, text
    # Still a useful log: who asked for which path, and the answer.
    assert any(re.search(r' 200 .*"GET /healthz HTTP/1\.1"$', line) for line in lines), text
    assert any(re.search(r' 101 .*"GET /v2 HTTP/1\.1"$', line) for line in lines), text
