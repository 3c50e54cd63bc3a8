"""Planner and word decoding: the engine's logic without a model."""

from __future__ import annotations

import numpy as np

from pinguin_daemon.engine.events import TextPiece, Word, WordEnd
from pinguin_daemon.engine.plan import SlotState, plan_step
from pinguin_daemon.engine.words import WordDecoder

START, PAD, NQ = 8000, 2048, 4


def frame(v: int) -> np.ndarray:
    return np.full(NQ, v, np.int64)


def test_only_occupied_slots_with_a_frame_step() -> None:
    slots = [SlotState(i) for i in range(4)]
    slots[0].reset("a")
    slots[1].reset("b")
    slots[3].reset("d")
    slots[0].pending.append(frame(5))
    slots[3].pending.append(frame(7))
    slots[2].pending.append(frame(9))  # a free slot never steps, whatever it holds
    plan = plan_step(slots, START, PAD, NQ)
    assert plan is not None
    assert plan.slots.tolist() == [0, 3]
    assert plan.positions.tolist() == [0, 0]


def test_first_step_feeds_start_and_padding_then_one_frame_lag() -> None:
    slot = SlotState(0)
    slot.reset("a")
    slot.pending.append(frame(5))
    plan = plan_step([slot], START, PAD, NQ)
    assert plan is not None
    assert plan.text_tokens.tolist() == [START]
    assert plan.audio_tokens.tolist() == [[PAD] * NQ]
    assert plan.frames[0].tolist() == [5] * NQ
    # The engine's update: the consumed frame becomes the next step's audio input.
    slot.pending.popleft()
    slot.prev_audio, slot.prev_text, slot.step = plan.frames[0], 42, 1
    slot.pending.append(frame(6))
    plan = plan_step([slot], START, PAD, NQ)
    assert plan is not None
    assert plan.text_tokens.tolist() == [42]
    assert plan.audio_tokens.tolist() == [[5] * NQ]
    assert plan.positions.tolist() == [1]


def test_nothing_to_do() -> None:
    slots = [SlotState(0), SlotState(1)]
    slots[0].reset("a")
    assert plan_step(slots, START, PAD, NQ) is None


def test_reset_forgets_the_previous_stream() -> None:
    slot = SlotState(0)
    slot.reset("a")
    slot.step, slot.prev_text, slot.prev_audio = 9, 17, frame(3)
    slot.pending.append(frame(1))
    slot.reset("b")
    assert (slot.session_id, slot.step, slot.prev_audio, len(slot.pending)) == ("b", 0, None, 0)


def decoder(delay: int = 2) -> WordDecoder:
    pieces = {10: "\u2581he", 11: "llo", 12: "\u2581you"}
    return WordDecoder(delay, pieces.__getitem__,
                       lambda ids: "".join(pieces[i] for i in ids).replace("\u2581", " ").strip())


def test_kyutai_word_rule() -> None:
    d = decoder(delay=2)
    out = [d.feed(t) for t in (3, 10, 11, 3, 0, 12, 0)]
    # Step 1 is inside the delay: nothing but text pieces can come out.
    assert out[0] == []
    assert out[1] == [TextPiece(" he", 10, 2)]
    assert out[2] == [TextPiece("llo", 11, 3)]
    # Padding after word tokens emits the word, starting at the last stop time (0.0).
    assert out[3] == [Word("hello", (10, 11), 0.0)]
    # A boundary ends it: stop = (step - delay) / 12.5 = (5 - 2) / 12.5.
    assert out[4] == [WordEnd(3 / 12.5)]
    assert out[5] == [TextPiece(" you", 12, 6)]
    assert out[6] == [Word("you", (12,), 3 / 12.5), WordEnd(5 / 12.5)]


def test_tokens_before_the_delay_are_not_words() -> None:
    d = decoder(delay=3)
    events = [e for t in (10, 0, 3, 3) for e in d.feed(t)]
    assert [type(e) for e in events] == [TextPiece]  # sent as text (as the seed does), no word
