"""The planner: which slots step this tick, and with what input. Pure: no MLX, no threads."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class SlotState:
    """One batch slot, as the engine thread sees it."""

    index: int  # the slot's row in the KV caches
    session_id: str | None = None  # owner, None when free
    step: int = 0  # model steps taken by the current stream
    prev_text: int = 0  # last sampled text token (input of the next step)
    prev_audio: np.ndarray | None = None  # codes of the last consumed frame (input of the next step)
    pending: deque[np.ndarray] = field(default_factory=deque)  # encoded frames waiting for a step
    sampled: bool = False  # this session samples with temperature > 0

    def reset(self, session_id: str | None, sampled: bool = False) -> None:
        """Make the slot a fresh stream for `session_id` (or free it with None)."""
        self.session_id = session_id
        self.step = 0
        self.prev_text = 0
        self.prev_audio = None
        self.pending.clear()
        self.sampled = sampled


@dataclass(frozen=True, slots=True)
class StepPlan:
    """The input of one batched step."""

    slots: np.ndarray  # (B,) slot indices stepping now, ascending
    positions: np.ndarray  # (B,) each stream's step index (0 = its first step)
    text_tokens: np.ndarray  # (B,) previous sampled token; the start token at a first step
    audio_tokens: np.ndarray  # (B, n_q) previous frame's codes; padding at a first step
    frames: tuple[np.ndarray, ...]  # the frame each row consumes now (its input next step)
    sample: np.ndarray  # (B,) bool: rows sampled with temperature instead of argmax


def plan_step(
    slots: Sequence[SlotState], start_token: int, pad_token: int, num_codebooks: int
) -> StepPlan | None:
    """Pick every occupied slot that has a frame waiting; slots without one do not advance.

    Args:
        slots: all slots, in index order.
        start_token: text token fed at a stream's first step (text_out_vocab_size).
        pad_token: audio token fed at a stream's first step (audio_vocab_size - 1).
        num_codebooks: audio codebooks per frame.

    Returns:
        The plan, or None when no slot can step.
    """
    ready = [s for s in slots if s.session_id is not None and s.pending]
    if not ready:
        return None
    audio = np.empty((len(ready), num_codebooks), np.int64)
    for row, slot in enumerate(ready):
        audio[row] = pad_token if slot.step == 0 or slot.prev_audio is None else slot.prev_audio
    return StepPlan(
        slots=np.array([s.index for s in ready], np.int64),
        positions=np.array([s.step for s in ready], np.int64),
        text_tokens=np.array([start_token if s.step == 0 else s.prev_text for s in ready], np.int64),
        audio_tokens=audio,
        frames=tuple(s.pending[0] for s in ready),
        sample=np.array([s.sampled for s in ready], bool),
    )
