"""Run the real daemon in a subprocess on 127.0.0.1, port 0, and a reference for its output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np

from pinguin_daemon.engine.events import Word, WordEnd
from pinguin_daemon.engine.reference import reference_run
from pinguin_daemon.engine.words import SPECIAL_TOKENS, WORD_MARKER, WordDecoder
from pinguin_daemon.model import loader
from pinguin_daemon.server.session import FLUSH_EXTRA_FRAMES

FRAME = loader.FRAME_SAMPLES


class DaemonProcess:
    """`pinguin-daemon serve` with JSON logs collected from stderr."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> None:
        """Args:
            args: more flags for `serve` (later flags win: --host too).
            env: more environment variables.
            prefix: a command to run it under, e.g. ("ip", "netns", "exec", NAME).
        """
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "pinguin_daemon", "serve", "--host", "127.0.0.1", "--port", "0",
             "--http-port", "0", "--wyoming-port", "0", "--log-format", "json", *args],
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


def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """Status and body of GET http://127.0.0.1:port/path (error statuses included)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def flushed_audio(pcm: np.ndarray, model: loader.LoadedModel) -> np.ndarray:
    """The samples the daemon encodes for `pcm` followed by a flush: the partial last frame
    zero-padded, then the model's delay (plus margin) of silence."""
    frames = -(-len(pcm) // FRAME)
    padded = np.zeros((frames + model.asr_delay_steps + FLUSH_EXTRA_FRAMES) * FRAME, np.float32)
    padded[: len(pcm)] = pcm
    return padded


_MIMI: dict[str, object] = {}


def stream_codes(model: loader.LoadedModel, samples: np.ndarray) -> np.ndarray:
    """The codes the daemon's encoder (the batched MLX Mimi, f32) gives a stream of whole frames
    alone: a fresh encoder, one frame per call. (Its codes equal Kyutai's rustymimi but for float
    near-ties; tests/test_batched_mimi.py measures that.)"""
    import mlx.core as mx

    from pinguin_daemon.engine.batched_mimi import BatchedMimiEncoder, load_mimi

    path = str(model.files.mimi_path)
    if path not in _MIMI:
        _MIMI[path] = load_mimi(path, model.num_codebooks, mx.float32)
    encoder = BatchedMimiEncoder(_MIMI[path], 1, mx.float32)  # type: ignore[arg-type]
    frames = samples.reshape(-1, FRAME)
    return np.stack([encoder.encode(np.array([0]), frame[None])[0] for frame in frames])


def reference_tokens(model: loader.LoadedModel, samples: np.ndarray) -> list[int]:
    """The reference for a stream alone on whole frames of samples: its codes (a fresh encoder),
    then Kyutai's LmGen alone, greedy."""
    return reference_run(model, stream_codes(model, samples)).tokens


def reference_words(model: loader.LoadedModel, tokens: list[int]) -> list[tuple[str, str, float]]:
    """Kyutai's word rule on tokens: ("word", text, start) and ("word_end", "", stop) in order."""
    tok = model.text_tokenizer
    decoder = WordDecoder(model.asr_delay_steps, tok.id_to_piece, lambda ids: tok.decode(list(ids)))
    out: list[tuple[str, str, float]] = []
    for token in tokens:
        for event in decoder.feed(token):
            if isinstance(event, Word):
                out.append(("word", event.text, round(event.start_time, 3)))
            elif isinstance(event, WordEnd):
                out.append(("word_end", "", round(event.stop_time, 3)))
    return out


def reference_text(model: loader.LoadedModel, pcm: np.ndarray) -> str:
    """What /ws must send for `pcm` alone: the reference on the same frames the daemon encodes
    (the partial last frame zero-padded, then the flush's silence)."""
    tokens = reference_tokens(model, flushed_audio(pcm, model))
    pieces = [model.text_tokenizer.id_to_piece(t) for t in tokens if t not in SPECIAL_TOKENS]
    return "".join(pieces).replace(WORD_MARKER, " ")
