"""EngineCore: slots, plan -> run -> update. Synchronous; the engine thread drives it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..model.loader import FRAME_RATE, FRAME_SAMPLES, LoadedModel, mx_dtype
from .batched_lm import BatchedLm, StepOutput
from .batched_mimi import BatchedMimiEncoder, load_mimi
from .events import EndOfTurnProbs, Event
from .plan import SlotState, StepPlan, plan_step
from .words import WordDecoder

# Text sampling with temperature keeps the `top_k` most likely tokens, as the seed's sampler.
TOP_K = 25


class EngineFull(Exception):
    """Every slot is taken."""


@dataclass(slots=True)
class Stream:
    """Decoding state of one session (lives with its slot on the engine thread)."""

    decoder: WordDecoder  # tokens -> pieces and words
    rng: np.random.Generator | None  # its own generator when sampling, so neighbours don't matter


class EngineCore:
    """Owns the batched model, the slots and each session's decoding state."""

    def __init__(self, model: LoadedModel, num_slots: int, temperature: float = 0.0,
                 seed: int = 0, encode_audio: bool = False, fixed_shape: bool = False,
                 encoder_dtype: str = "f32") -> None:
        """Args:
            model: the loaded checkpoint.
            num_slots: concurrent sessions (batch rows).
            temperature: 0 for greedy (Kyutai's reference), > 0 to sample.
            seed: base seed; each session's generator is seeded from it and the session id.
            encode_audio: sessions push 1920-sample PCM frames and each step encodes them with
                the batched MLX Mimi first; otherwise they push codes encoded elsewhere.
            fixed_shape: every step computes every slot (see BatchedLm), for accelerators.
            encoder_dtype: the batched Mimi's compute dtype ("f32": codes equal rustymimi's).
        """
        self.model = model
        self.batched = BatchedLm(model.lm, num_slots, mx_dtype(model.dtype), fixed_shape)
        self.encoder: BatchedMimiEncoder | None = None
        if encode_audio:
            dtype = mx_dtype(encoder_dtype)
            mimi = load_mimi(str(model.files.mimi_path), model.num_codebooks, dtype)
            self.encoder = BatchedMimiEncoder(mimi, num_slots, dtype, fixed_shape)
        self.slots = [SlotState(i) for i in range(num_slots)]
        self.streams: dict[str, Stream] = {}
        self.slot_of: dict[str, int] = {}
        self.temperature = temperature
        self.seed = seed
        tokenizer = model.text_tokenizer
        self._piece_of = tokenizer.id_to_piece
        self._text_of = lambda ids: tokenizer.decode(list(ids))

    @property
    def free_slots(self) -> int:
        return sum(1 for s in self.slots if s.session_id is None)

    def join(self, session_id: str) -> int:
        """Give `session_id` a free slot, reset; raises EngineFull when there is none."""
        if session_id in self.slot_of:
            raise ValueError(f"session {session_id} already has a slot")
        slot = next((s for s in self.slots if s.session_id is None), None)
        if slot is None:
            raise EngineFull
        slot.reset(session_id, sampled=self.temperature > 0)
        self.batched.reset_slot(slot.index)
        if self.encoder is not None:
            self.encoder.reset_slot(slot.index)
        rng = None
        if self.temperature > 0:
            rng = np.random.default_rng([self.seed, *session_id.encode()])
        self.streams[session_id] = Stream(
            WordDecoder(self.model.asr_delay_steps, self._piece_of, self._text_of, FRAME_RATE), rng)
        self.slot_of[session_id] = slot.index
        return slot.index

    def push(self, session_id: str, frame: np.ndarray) -> None:
        """Queue one frame for the session: (1920,) float32 samples when the engine encodes
        audio, else (n_q,) codes."""
        self.slots[self.slot_of[session_id]].pending.append(frame)

    def pending_frames(self, session_id: str) -> int:
        return len(self.slots[self.slot_of[session_id]].pending)

    def leave(self, session_id: str) -> None:
        """Free the session's slot (a no-op for an unknown session: aborts may race closes)."""
        index = self.slot_of.pop(session_id, None)
        self.streams.pop(session_id, None)
        if index is not None:
            self.slots[index].reset(None)
            self.batched.reset_slot(index)
            if self.encoder is not None:
                self.encoder.reset_slot(index)

    def has_work(self) -> bool:
        """Some occupied slot has a frame waiting (the engine thread blocks only when not)."""
        return any(s.session_id is not None and s.pending for s in self.slots)

    def plan(self) -> StepPlan | None:
        return plan_step(self.slots, self.batched.text_start_token, self.batched.audio_pad_token,
                         self.batched.num_codebooks)

    def run(self, plan: StepPlan) -> StepOutput:
        """Encode this step's frames (when the engine encodes audio), then one LM step."""
        codes = None
        if self.encoder is not None:
            codes = self.encoder.encode(plan.slots, np.stack(plan.frames))
        out = self.batched.step(plan.slots, plan.positions, plan.text_tokens, plan.audio_tokens,
                                plan.sample)
        return out if codes is None else dataclasses.replace(out, codes=codes)

    def update(self, plan: StepPlan, out: StepOutput) -> dict[str, list[Event]]:
        """Turn the step's tokens into per-session events and advance each stepped slot."""
        events: dict[str, list[Event]] = {}
        for row, index in enumerate(plan.slots):
            slot = self.slots[int(index)]
            assert slot.session_id is not None
            stream = self.streams[slot.session_id]
            token = int(out.tokens[row])
            if plan.sample[row] and out.logits is not None and stream.rng is not None:
                token = sample_top_k(out.logits[row], self.temperature, stream.rng)
            slot.pending.popleft()
            slot.prev_audio = plan.frames[row] if out.codes is None else out.codes[row]
            slot.prev_text = token
            slot.step += 1
            evs = stream.decoder.feed(token)
            if out.vad is not None:
                evs.append(EndOfTurnProbs(slot.step, tuple(float(p) for p in out.vad[row])))
            events[slot.session_id] = evs
        return events

    def step(self) -> dict[str, list[Event]]:
        """Plan, run and update one batched step; {} when no slot has a frame."""
        plan = self.plan()
        if plan is None:
            return {}
        return self.update(plan, self.run(plan))

    def warmup(self, steps: int = 2) -> None:
        """Run a few throwaway steps on every slot (compiles kernels, touches all weights)."""
        ids = [f"warmup-{i}" for i in range(len(self.slots))]
        silence = (np.zeros(FRAME_SAMPLES, np.float32) if self.encoder is not None
                   else np.zeros(self.batched.num_codebooks, np.int64))
        for sid in ids:
            self.join(sid)
        for _ in range(steps):
            for sid in ids:
                self.push(sid, silence)
            self.step()
        for sid in ids:
            self.leave(sid)


def sample_top_k(logits: np.ndarray, temperature: float, rng: np.random.Generator,
                 top_k: int = TOP_K) -> int:
    """Sample a token from the `top_k` most likely, with temperature, using the session's rng."""
    top = np.argpartition(logits, -top_k)[-top_k:]
    scaled = logits[top].astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    return int(top[rng.choice(len(top), p=probs)])

