"""The engine thread: the one owner of MLX, from loading to teardown.

Other threads talk to it only through `Engine`'s methods, which put commands on a thread-safe
inbox; events go back through each session's sink, called on the engine thread (the server
hands them to its event loop with `loop.call_soon_threadsafe`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..logs import get_logger
from ..model.loader import LoadedModel
from .core import EngineCore
from .events import Event, SessionClosed

# Called on the engine thread once per step of its session with that step's events (maybe none),
# and once more with [SessionClosed] when the slot is released.
Sink = Callable[[list[Event]], None]
log = get_logger("engine")


def mlx_device() -> str:
    """What MLX computes on: "metal", "cuda", or "cpu" (a CPU-only MLX, or no GPU found)."""
    import mlx.core as mx

    if mx.default_device().type != mx.DeviceType.gpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    return "cuda" if cuda is not None and cuda.is_available() else "gpu"


# A step slower than one frame (80 ms) cannot keep up with real time: warn about it.
REALTIME_BUDGET_S = 0.080


@dataclass(frozen=True, slots=True)
class _Join:
    session_id: str
    sink: Sink


@dataclass(frozen=True, slots=True)
class _Frame:
    session_id: str
    frame: np.ndarray  # (1920,) samples (mlx encoder) or (n_q,) audio codes


@dataclass(frozen=True, slots=True)
class _Leave:
    session_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class _Stop:
    pass


Command = _Join | _Frame | _Leave | _Stop


class Engine:
    """Runs `EngineCore` on a dedicated thread and admits sessions up to the slot count."""

    def __init__(self, load: Callable[[], LoadedModel], num_slots: int, temperature: float = 0.0,
                 seed: int = 0, mode: str = "batched", encode_audio: bool = True) -> None:
        """Args:
            load: builds the model; called on the engine thread (MLX stays on one thread).
            num_slots: concurrent sessions.
            temperature: sampling temperature (0 = greedy).
            seed: base seed for sampling.
            mode: "batched" (one MLX step for all slots) or "sequential" (the seed's design:
                one LmGen per session, stepped one after another; a benchmark baseline).
            encode_audio: the engine encodes audio with its batched Mimi (sessions submit 1920-sample
                PCM frames: the daemon); False: sessions submit audio codes (tests of the LM alone).
        """
        self._mode = mode
        self._encode_audio = encode_audio
        self.device = ""  # what MLX computes on, once loaded
        self._load = load
        self.num_slots = num_slots
        self._temperature = temperature
        self._seed = seed
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        # Admission: taken by open_session (any thread), given back when the engine frees the slot,
        # so a Join always finds a free slot on the engine thread.
        self._admission = threading.BoundedSemaphore(num_slots)
        self._in_use = 0  # slots taken by open_session and not yet freed by the engine thread
        self._in_use_lock = threading.Lock()
        self._sinks: dict[str, Sink] = {}  # engine thread only
        self._thread = threading.Thread(target=self._run, name="pinguin-engine", daemon=True)
        self.ready = threading.Event()  # model loaded and warmed
        self.failed: BaseException | None = None  # why the thread died, if it did
        self.model: LoadedModel | None = None
        self.load_seconds = 0.0  # time to load and warm the model
        # Called on the engine thread after each step with (seconds, rows): metrics.
        self.on_step: Callable[[float, int], None] | None = None

    # ---- any thread -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.failed is None

    def open_session(self, session_id: str, sink: Sink) -> bool:
        """Reserve a slot for `session_id`; False when every slot is taken."""
        if not self._admission.acquire(blocking=False):
            return False
        with self._in_use_lock:
            self._in_use += 1
        self._inbox.put(_Join(session_id, sink))
        return True

    @property
    def free_slots(self) -> int:
        """Slots a new session can take now (a leaving session's slot counts as free once the
        engine thread has dropped it, before its next step)."""
        with self._in_use_lock:
            return self.num_slots - self._in_use

    def submit(self, session_id: str, frame: np.ndarray) -> None:
        """Queue one frame for the session: (1920,) samples (or codes, without encode_audio)."""
        self._inbox.put(_Frame(session_id, frame))

    def close_session(self, session_id: str, reason: str = "closed") -> None:
        """Release the session's slot before the next step; its sink gets SessionClosed."""
        self._inbox.put(_Leave(session_id, reason))

    def stop(self, timeout: float = 10.0) -> None:
        self._inbox.put(_Stop())
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            started = time.perf_counter()
            self.device = mlx_device()
            self.model = self._load()
            on_gpu = self.device != "cpu"
            # On a GPU, steps of a fixed shape: kernels never depend on who else is connected.
            core_class = EngineCore
            if self._mode == "sequential":
                from .sequential import SequentialCore

                core_class = SequentialCore
            core = core_class(self.model, self.num_slots, self._temperature, self._seed,
                              encode_audio=self._encode_audio, fixed_shape=on_gpu)
            core.warmup()
            self.load_seconds = time.perf_counter() - started
            log.info("engine_ready", slots=self.num_slots, load_s=round(self.load_seconds, 2),
                     device=self.device, dtype=self.model.dtype, fixed_shape=on_gpu)
            self.ready.set()
            self._loop(core)
        except BaseException as exc:  # noqa: BLE001 - reported through `failed` and the log
            self.failed = exc
            # A UserError (a bad setting or file, no network for the download) is the one line
            # the daemon's caller prints; anything else is a bug, logged with its traceback.
            if not isinstance(exc, UserError):
                log.exception("engine_failed")

    def _apply(self, core: EngineCore, command: Command) -> bool:
        """Apply one inbox command; False on stop."""
        if isinstance(command, _Stop):
            return False
        if isinstance(command, _Join):
            core.join(command.session_id)
            self._sinks[command.session_id] = command.sink
        elif isinstance(command, _Frame):
            if command.session_id in core.slot_of:  # frames racing a close are dropped with it
                core.push(command.session_id, command.frame)
        elif isinstance(command, _Leave):
            sink = self._sinks.pop(command.session_id, None)
            if command.session_id in core.slot_of:
                core.leave(command.session_id)
                with self._in_use_lock:
                    self._in_use -= 1
                self._admission.release()
            if sink is not None:
                sink([SessionClosed(command.reason)])
        return True

    def _loop(self, core: EngineCore) -> None:
        while True:
            # Block only when no slot has work; then take everything that has arrived, so aborts
            # and joins apply before the next step and every ready slot joins the batch.
            block = not core.has_work()
            try:
                command = self._inbox.get(block=block)
                while True:
                    if not self._apply(core, command):
                        return
                    command = self._inbox.get_nowait()
            except queue.Empty:
                pass
            plan = core.plan()
            if plan is None:
                continue
            started = time.perf_counter()
            events = core.update(plan, core.run(plan))
            elapsed = time.perf_counter() - started
            if self.on_step is not None:
                self.on_step(elapsed, len(plan.slots))
            if elapsed > REALTIME_BUDGET_S:
                log.warning("slow_step", ms=round(elapsed * 1000, 1), rows=len(plan.slots))
            for session_id, evs in events.items():
                sink = self._sinks.get(session_id)
                if sink is not None:
                    sink(evs)  # once per step of the session, even when empty: a frame was consumed
