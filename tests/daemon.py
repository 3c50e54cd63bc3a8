"""Run the real daemon in a subprocess on 127.0.0.1, port 0, and a reference for its output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np

from pinguin_daemon.engine.reference import reference_run
from pinguin_daemon.engine.words import SPECIAL_TOKENS, WORD_MARKER
from pinguin_daemon.model import loader
from pinguin_daemon.server.session import FLUSH_EXTRA_FRAMES

FRAME = loader.FRAME_SAMPLES


class DaemonProcess:
    """`pinguin-daemon serve` with JSON logs collected from stderr."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pinguin_daemon", "serve", "--host", "127.0.0.1", "--port", "0",
             "--log-format", "json", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})},
        )
        self.logs: list[dict[str, object]] = []
        self.raw: list[str] = []
        self._listening = threading.Event()
        self.port = 0
        threading.Thread(target=self._read, daemon=True).start()
        if not self._listening.wait(120):
            self.stop()
            raise RuntimeError("daemon did not start:\n" + "".join(self.raw[-30:]))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.raw.append(line)
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.logs.append(record)
            if record.get("event") == "listening":
                self.port = int(record["port"])  # type: ignore[arg-type]
                self._listening.set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def events(self, name: str) -> list[dict[str, object]]:
        return [r for r in self.logs if r.get("event") == name]

    def wait_event(self, name: str, count: int = 1, timeout: float = 60) -> list[dict[str, object]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no {count} '{name}' log events; got {[r.get('event') for r in self.logs]}")

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def reference_text(model: loader.LoadedModel, pcm: np.ndarray) -> str:
    """What /ws must send for `pcm` alone: Kyutai's reference on the same frames the daemon
    encodes (the partial last frame zero-padded, then the flush's silence)."""
    frames = -(-len(pcm) // FRAME)
    padded = np.zeros((frames + model.asr_delay_steps + FLUSH_EXTRA_FRAMES) * FRAME, np.float32)
    padded[: len(pcm)] = pcm
    tokenizer = model.make_audio_tokenizer()
    codes = tokenizer.encode_step(padded[None, None])[0].T.astype(np.int64)
    tokens = reference_run(model, codes).tokens
    pieces = [model.text_tokenizer.id_to_piece(t) for t in tokens if t not in SPECIAL_TOKENS]
    return "".join(pieces).replace(WORD_MARKER, " ")
