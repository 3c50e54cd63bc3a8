"""The seed's design, made correct, for comparison: one `LmGen` per session, each with its own
KV cache, stepped one after another. Used by `make bench` as the baseline (config
`engine = "sequential"`); never the default.

Like the seed (`LmGen(max_steps=4096)`), a session cannot go past 4096 steps (~5.5 minutes).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from moshi_mlx import models, utils
from moshi_mlx.modules.transformer import LayerCache

from .batched_lm import StepOutput
from .core import EngineCore
from .plan import StepPlan

MAX_STEPS = 4096  # the seed's LmGen limit


class SequentialCore(EngineCore):
    """Same slots, plan and update as EngineCore; `run` steps each stream alone."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._gens: dict[int, tuple[list[LayerCache], models.LmGen]] = {}

    def join(self, session_id: str) -> int:
        index = super().join(session_id)
        lm = self.model.lm
        cache = lm.transformer.make_rot_cache()
        gen = models.LmGen(lm, max_steps=MAX_STEPS, text_sampler=utils.Sampler(temp=0),
                           audio_sampler=utils.Sampler(temp=0))
        self._gens[index] = (cache, gen)
        return index

    def leave(self, session_id: str) -> None:
        index = self.slot_of.get(session_id)
        super().leave(session_id)
        if index is not None:
            self._gens.pop(index, None)

    def run(self, plan: StepPlan) -> StepOutput:
        lm = self.model.lm
        tokens = np.zeros(len(plan.slots), np.int64)
        vad = np.zeros((len(plan.slots), len(lm.extra_heads)), np.float32) if lm.extra_heads else None
        codes = (self.encoder.encode(plan.slots, np.stack(plan.frames)) if self.encoder is not None
                 else np.stack(plan.frames))
        for row, slot in enumerate(plan.slots):
            cache, gen = self._gens[int(slot)]
            lm.transformer_cache = cache
            audio = mx.array(codes[row][None].astype(np.int32))  # LmGen keeps the lag itself
            if vad is not None:
                token, heads = gen.step_with_extra_heads(audio)
                mx.eval(token, heads)
                vad[row] = [float(h[0, 0, 0]) for h in heads]
            else:
                token, _ = gen.step(audio)  # (text tokens, transformer output)
            tokens[row] = int(np.array(token).reshape(-1)[0])
        return StepOutput(tokens=tokens, logits=None, vad=vad,
                          codes=codes if self.encoder is not None else None)
