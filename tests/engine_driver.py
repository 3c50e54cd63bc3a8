"""Drive EngineCore through a schedule of joins, frames, skips and leaves; record its output."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pinguin_daemon.engine.core import EngineCore
from pinguin_daemon.engine.reference import ReferenceRun


@dataclass
class StreamSpec:
    """One session of a schedule."""

    name: str
    codes: np.ndarray  # (T, n_q) frames it sends
    join_tick: int  # tick at which it connects
    leave_after: int | None = None  # frames after which it disconnects mid-stream (None: all)
    skip_every: int = 0  # sends nothing on ticks divisible by this (0: never skips)

    @property
    def frames(self) -> int:
        return len(self.codes) if self.leave_after is None else self.leave_after


@dataclass
class Recorded:
    tokens: dict[str, list[int]] = field(default_factory=dict)
    vad: dict[str, list[tuple[float, ...]]] = field(default_factory=dict)
    slots: dict[str, int] = field(default_factory=dict)
    max_batch: int = 0


def run_schedule(core: EngineCore, specs: list[StreamSpec], max_ticks: int = 100_000) -> Recorded:
    """Tick until every stream has sent its frames and been stepped; streams leave when done.

    A stream joins when its tick comes and a slot is free (otherwise it waits), so slots are
    reused by later streams.
    """
    rec = Recorded()
    sent = {s.name: 0 for s in specs}
    done: set[str] = set()
    for tick in range(max_ticks):
        for spec in specs:
            name = spec.name
            if name in done:
                continue
            if name not in core.slot_of and tick >= spec.join_tick and core.free_slots:
                rec.slots[name] = core.join(name)
                rec.tokens[name], rec.vad[name] = [], []
            if name not in core.slot_of:
                continue
            if sent[name] < spec.frames and not (spec.skip_every and tick % spec.skip_every == 0):
                core.push(name, spec.codes[sent[name]])
                sent[name] += 1
        plan = core.plan()
        if plan is not None:
            out = core.run(plan)
            core.update(plan, out)
            rec.max_batch = max(rec.max_batch, len(plan.slots))
            for row, slot in enumerate(plan.slots):
                name = core.slots[int(slot)].session_id
                assert name is not None
                rec.tokens[name].append(int(core.slots[int(slot)].prev_text))
                rec.vad[name].append(() if out.vad is None else tuple(out.vad[row].tolist()))
        for spec in specs:
            if (spec.name in core.slot_of and sent[spec.name] == spec.frames
                    and core.pending_frames(spec.name) == 0):
                core.leave(spec.name)
                done.add(spec.name)
        if len(done) == len(specs):
            return rec
    raise AssertionError("schedule did not finish")


def mismatches(rec: Recorded, refs: dict[str, ReferenceRun], vad_tol: float = 1e-5) -> list[str]:
    """Human-readable differences between the engine and the reference (empty when equal)."""
    problems = []
    for name, ref in refs.items():
        got = rec.tokens[name]
        want = ref.tokens[: len(got)]
        if len(got) != len(ref.tokens):
            problems.append(f"{name}: {len(got)} steps, reference {len(ref.tokens)}")
        diff = [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b]
        if diff:
            problems.append(f"{name}: {len(diff)} tokens differ, first at step {diff[0]}")
        for i, (a, b) in enumerate(zip(rec.vad[name], ref.vad, strict=False)):
            if len(a) != len(b) or (a and max(abs(x - y) for x, y in zip(a, b, strict=True)) > vad_tol):
                problems.append(f"{name}: VAD differs at step {i}: {a} vs {b}")
                break
    return problems
