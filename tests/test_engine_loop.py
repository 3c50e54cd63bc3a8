"""The engine thread: admission up to the slot count, events through sinks, slots released."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from pinguin_daemon.engine.events import Event, SessionClosed, TextPiece
from pinguin_daemon.engine.loop import Engine
from pinguin_daemon.engine.reference import fresh_reference_model, reference_run
from pinguin_daemon.model import loader, store

TIMEOUT = 60


class Collector:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.steps = 0
        self.closed = threading.Event()

    def __call__(self, events: list[Event]) -> None:
        if any(isinstance(e, SessionClosed) for e in events):
            self.closed.set()
        else:
            self.steps += 1
        self.events.extend(events)


def wait_for(predicate, timeout: float = TIMEOUT) -> None:
    done = threading.Event()
    for _ in range(int(timeout * 20)):
        if predicate():
            return
        done.wait(0.05)
    raise AssertionError("condition not reached")


def test_engine_thread_serves_sessions(synthetic_dir: Path) -> None:
    files = store.files_in_directory(synthetic_dir, "none")
    engine = Engine(lambda: loader.load_model(files, "f32"), num_slots=2, encode_audio=False)
    engine.start()
    try:
        assert engine.ready.wait(TIMEOUT) and engine.alive
        rng = np.random.default_rng(4)
        codes = {name: rng.integers(0, 2048, (30, 32)) for name in ("a", "b", "c")}
        sinks = {name: Collector() for name in codes}
        assert engine.open_session("a", sinks["a"])
        assert engine.open_session("b", sinks["b"])
        assert not engine.open_session("c", sinks["c"])  # full: refused, not queued
        for t in range(30):
            engine.submit("a", codes["a"][t])
            if t < 10:
                engine.submit("b", codes["b"][t])
        wait_for(lambda: sinks["b"].steps == 10)
        engine.close_session("b", "client left")
        assert sinks["b"].closed.wait(TIMEOUT)
        assert sinks["b"].events[-1] == SessionClosed("client left")
        # The slot came back: the next session gets it, with a clean history.
        assert engine.open_session("c", sinks["c"])
        for t in range(30):
            engine.submit("c", codes["c"][t])
        wait_for(lambda: sinks["a"].steps == 30 and sinks["c"].steps == 30)
        ref_model = fresh_reference_model(engine.model)  # type: ignore[arg-type]
        for name in ("a", "c"):
            ref = reference_run(ref_model, codes[name])
            want = [engine.model.text_tokenizer.id_to_piece(t).replace("\u2581", " ")  # type: ignore[union-attr]
                    for t in ref.tokens if t not in (0, 3)]
            got = [e.text for e in sinks[name].events if isinstance(e, TextPiece)]
            assert got == want
    finally:
        engine.stop()
    assert not engine.alive
