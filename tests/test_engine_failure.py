"""If the engine thread dies, every session is closed with 1011 and the daemon exits 1, so its
supervisor (launchd KeepAlive, systemd Restart=on-failure) starts a fresh one."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from pinguin_daemon.config import Config
from pinguin_daemon.server.app import Daemon


def test_engine_failure_closes_sessions_with_1011_and_exits_1(synthetic_dir: Path) -> None:
    cfg = dataclasses.replace(Config(), host="127.0.0.1", port=0, model=str(synthetic_dir),
                              dtype="f32", max_sessions=2)
    daemon = Daemon(cfg)

    def failing_step(seconds: float, rows: int) -> None:
        raise RuntimeError("simulated failure inside the engine thread")

    async def scenario() -> tuple[int, tuple[int, str]]:
        server = asyncio.create_task(daemon.run())
        for _ in range(600):
            if daemon.state == "serving":
                break
            await asyncio.sleep(0.05)
        assert daemon.state == "serving"
        async with connect(f"ws://127.0.0.1:{daemon.port}/ws") as ws:
            daemon.engine.on_step = failing_step  # the next step raises on the engine thread
            await ws.send(np.zeros(4 * 1920, "<f4").tobytes())
            try:
                await asyncio.wait_for(ws.recv(), 30)
                closed = (0, "no close")
            except ConnectionClosed as exc:
                closed = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (1006, "")
        return await asyncio.wait_for(server, 30), closed

    exit_code, (code, reason) = asyncio.run(scenario())
    assert exit_code == 1
    assert code == 1011 and reason == "inference engine stopped; try again later"
    assert daemon.state == "stopped" and not daemon.engine.alive
