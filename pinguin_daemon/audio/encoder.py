"""Mimi encoding on a pool of worker threads, one streaming encoder per session.

rustymimi releases the GIL, so sessions encode in parallel with each other and with the engine's
MLX step. Each `rustymimi.Tokenizer` holds its own copy of the codec weights (~450 MB, ~0.5 s
to build), so at most one exists per slot.

Encoders are never reused: rustymimi 0.4.1's `reset()` does not restore a fresh encoder's state
(the first frame after a reset encodes differently), so a session that reused one would not get
the reference's codes. A used encoder is dropped and a fresh spare is built in the background,
off the next session's path.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..logs import get_logger

log = get_logger("encoder")

# Fresh encoders kept ready for the next sessions (each ~450 MB).
SPARES = 1


class EncoderPool:
    """Worker threads and fresh streaming Mimi encoders."""

    def __init__(self, factory: Any, max_encoders: int, threads: int) -> None:
        """Args:
            factory: builds a fresh `rustymimi.Tokenizer` (LoadedModel.make_audio_tokenizer).
            max_encoders: most encoders alive at once (one per slot).
            threads: worker threads.
        """
        self._factory = factory
        self._fresh: list[Any] = []  # built, never used
        self._alive = 0  # fresh + in use + being built; never above max_encoders
        self._lock = threading.Lock()  # guards _fresh and _alive across worker threads
        self.max_encoders = max_encoders
        self.threads = threads
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mimi")
        # Builds run on their own thread: a session's encode never queues behind a 0.5 s build.
        self.builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mimi-build")

    def preload(self) -> None:
        """Build the first spare now (fails early on a bad codec file)."""
        self._build_spare()

    def _build_spare(self) -> None:
        with self._lock:
            if self._alive >= self.max_encoders or len(self._fresh) >= SPARES:
                return
            self._alive += 1
        try:
            encoder = self._factory()
        except BaseException:
            with self._lock:
                self._alive -= 1
            raise
        with self._lock:
            self._fresh.append(encoder)

    def _take(self) -> Any:
        with self._lock:
            if self._fresh:
                return self._fresh.pop()
            self._alive += 1
        try:
            return self._factory()
        except BaseException:
            with self._lock:
                self._alive -= 1
            raise

    async def acquire(self) -> Any:
        """A fresh encoder for a new session (built on the build thread if no spare is ready).
        Cancellation-safe: if the session goes away first, the encoder becomes a spare."""
        with self._lock:
            if self._fresh:
                return self._fresh.pop()
        future = asyncio.get_running_loop().run_in_executor(self.builder, self._take)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(self._keep_unused)
            raise

    def _keep_unused(self, future: asyncio.Future[Any]) -> None:
        """An encoder built for a session that left before using it: still fresh, keep it."""
        if future.cancelled() or future.exception() is not None:
            return
        with self._lock:
            self._fresh.append(future.result())

    def release(self, encoder: Any) -> None:
        """Drop a used encoder and build a fresh spare in the background."""
        del encoder
        with self._lock:
            self._alive -= 1
        future = self.builder.submit(self._build_spare)
        future.add_done_callback(_log_failure)

    async def encode(self, encoder: Any, frames: np.ndarray) -> np.ndarray:
        """Encode whole frames (n, 1920) of one session in order; returns codes (n, n_q)."""
        pcm = np.ascontiguousarray(frames.reshape(1, 1, -1), dtype=np.float32)
        codes = await asyncio.get_running_loop().run_in_executor(self.executor, encoder.encode_step, pcm)
        return np.asarray(codes[0].T, dtype=np.int64)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.builder.shutdown(wait=False, cancel_futures=True)


def _log_failure(future: Any) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("encoder_build_failed", error=repr(future.exception()))
