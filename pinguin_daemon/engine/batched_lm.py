"""One MLX step of the Kyutai LM over any subset of slots, each at its own position.

moshi_mlx keeps one KV cache with one offset for the whole batch on the `Lm`. Sessions that join
and leave at different times need, per slot: a position, a ring KV cache of `context + 1` cells
per layer, RoPE at that slot's position, and a mask over the cells it has filled. This module
reuses the `Lm`'s own modules and weights (embeddings, norms, projections, gating, `out_norm`,
`text_linear`, `extra_heads`, quantized or not) and rewrites only attention's position handling.

Everything here runs on the engine thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from moshi_mlx import models


@dataclass(frozen=True, slots=True)
class StepOutput:
    """What one batched step produced, one row per planned slot (host arrays)."""

    tokens: np.ndarray  # (B,) int: greedy tokens (argmax), or sampled when logits were asked for
    logits: np.ndarray | None  # (B, V) float32 for rows that sample with temperature, else None
    vad: np.ndarray | None  # (B, heads) float32: P(end of turn) per head; None without heads
    codes: np.ndarray | None = None  # (B, n_q) codes of the frames consumed now, when the engine encoded them


class BatchedLm:
    """Per-slot KV rings and positions around a loaded moshi_mlx `Lm`."""

    def __init__(self, lm: models.Lm, num_slots: int, dtype: mx.Dtype, fixed_shape: bool = False) -> None:
        """Allocate the caches.

        Args:
            lm: the loaded model (weights are shared, never copied).
            num_slots: batch slots (max concurrent sessions).
            dtype: compute dtype (mx.bfloat16 or mx.float32).
            fixed_shape: every step computes every slot over the whole window, rows without a
                frame masked and their caches untouched: no kernel sees a shape that depends on
                who else is connected (accelerators: bit-identical rows alone or in company, and
                no gather of the active rows' caches). Otherwise only the active rows are
                gathered, over the filled prefix of the window (faster on CPU).
        """
        cfg = lm.cfg.transformer
        self.lm = lm
        self.dtype = dtype
        self.fixed_shape = fixed_shape
        self.num_slots = num_slots
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.d_model // cfg.num_heads
        # The reference attends to the current key plus `context` previous ones.
        self.cells = cfg.context + 1
        self.rope_base = float(cfg.max_period)
        self.text_start_token = lm.cfg.text_out_vocab_size
        self.audio_pad_token = lm.cfg.audio_padding_token
        self.num_codebooks = lm.cfg.audio_codebooks
        shape = (num_slots, self.num_heads, self.cells, self.head_dim)
        # Per layer: keys and values, slot-major; cell = position % cells.
        self.keys = [mx.zeros(shape, dtype) for _ in lm.transformer.layers]
        self.values = [mx.zeros(shape, dtype) for _ in lm.transformer.layers]
        # Absolute position stored in each cell, -1 when empty (host side: masks are built here).
        self.cell_pos = np.full((num_slots, self.cells), -1, np.int64)
        mx.eval(self.keys, self.values)
        # RoPE as mx.fast.rope computes it (mlx 0.32), so that a slot's tokens are the reference's:
        # angles in float32; on the CPU, cos/sin rounded to the compute dtype and the rotation
        # done in it (bit-identical to the CPU kernel, checked up to position 9000 in bf16); on a
        # GPU the fused kernel rotates in float32, so the rotation stays in float32 there.
        self._rotate_in_f32 = mx.default_device() != mx.cpu
        half = self.head_dim // 2
        self._inv_freq = mx.exp(
            mx.arange(0, -half, -1, dtype=mx.float32)
            * mx.array(math.log(self.rope_base) / half, dtype=mx.float32)
        )

    def reset_slot(self, slot: int) -> None:
        """Forget a slot's history: its cells become empty (masked), so old keys are never seen."""
        self.cell_pos[slot] = -1

    def _step_all(self, slots: np.ndarray, positions: np.ndarray, text_tokens: np.ndarray,
                  audio_tokens: np.ndarray, want_logits: np.ndarray | None) -> StepOutput:
        """A fixed-shape step: every slot is a row; those not in `slots` are masked out."""
        active = np.zeros(self.num_slots, bool)
        active[slots] = True
        full_pos = np.zeros(self.num_slots, np.int64)
        full_pos[slots] = positions
        full_text = np.full(self.num_slots, self.text_start_token, np.int64)
        full_text[slots] = text_tokens
        full_audio = np.full((self.num_slots, self.num_codebooks), self.audio_pad_token, np.int64)
        full_audio[slots] = audio_tokens
        full_want = None
        if want_logits is not None:
            full_want = np.zeros(self.num_slots, bool)
            full_want[slots] = want_logits
        out = self.step(np.arange(self.num_slots), full_pos, full_text, full_audio, full_want, active)
        return StepOutput(tokens=out.tokens[slots],
                          logits=None if out.logits is None else out.logits[slots],
                          vad=None if out.vad is None else out.vad[slots])

    def _rope(self, x: mx.array, positions: mx.array) -> mx.array:
        """Rotary embedding with one position per row. x: (B, H, 1, Dh); positions: (B,)."""
        theta = positions.astype(mx.float32)[:, None] * self._inv_freq[None]
        cos = mx.cos(theta)[:, None, None, :]
        sin = mx.sin(theta)[:, None, None, :]
        if not self._rotate_in_f32:
            cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
        x1 = x[..., 0::2]
        x2 = x[..., 1::2]
        rotated = mx.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
        return rotated.reshape(x.shape).astype(x.dtype)

    def step(
        self,
        slots: np.ndarray,
        positions: np.ndarray,
        text_tokens: np.ndarray,
        audio_tokens: np.ndarray,
        want_logits: np.ndarray | None = None,
        active_rows: np.ndarray | None = None,
    ) -> StepOutput:
        """Run one step for the given slots.

        Args:
            slots: (B,) distinct slot indices, ascending.
            positions: (B,) each slot's step index (0 at a stream's first step).
            text_tokens: (B,) previous sampled text token (start token at position 0).
            audio_tokens: (B, n_q) previous audio frame's codes (padding at position 0).
            want_logits: (B,) bool, rows whose logits the caller samples itself.
            active_rows: (B,) bool, rows that consume a frame now (None: all); the others are
                computed for the shape's sake only and leave their caches untouched.
        """
        if self.fixed_shape and len(slots) < self.num_slots:
            return self._step_all(slots, positions, text_tokens, audio_tokens, want_logits)
        lm = self.lm
        batch = len(slots)
        all_slots = batch == self.num_slots  # slots are ascending and distinct: 0..S-1
        cells = positions % self.cells
        if active_rows is None:
            self.cell_pos[slots, cells] = positions
        else:
            self.cell_pos[slots[active_rows], cells[active_rows]] = positions[active_rows]
        # Until a ring wraps, cells past the highest position are empty for every row: attend to
        # the filled prefix only (dropping fully masked keys leaves the result bit-identical).
        span = self.cells if self.fixed_shape else int(min(self.cells, positions.max() + 1))
        valid = self.cell_pos[slots, :span] >= 0
        if active_rows is not None:  # rows without a frame attend to one cell: finite, unused
            valid[~active_rows, 0] = True
        mask = mx.array(np.where(valid, 0.0, -np.inf)[:, None, None, :]).astype(self.dtype)
        pos = mx.array(positions.astype(np.int32))
        row_idx = mx.array(slots.astype(np.int32))
        # Cache writes: every row, or only the rows that have a frame.
        writing = slots if active_rows is None else slots[active_rows]
        slot_idx = mx.array(writing.astype(np.int32))
        cell_idx = mx.array((cells if active_rows is None else cells[active_rows]).astype(np.int32))
        write_rows = None if active_rows is None else mx.array(np.flatnonzero(active_rows).astype(np.int32))

        # Same summation order as Lm._sample: text embedding, then each codebook in turn.
        xs = lm.text_emb(mx.array(text_tokens.astype(np.int32))[:, None])
        audio = mx.array(audio_tokens.astype(np.int32))
        for cb, emb in enumerate(lm.audio_embs):
            xs = xs + emb(audio[:, cb : cb + 1])

        new_state = []
        for i, layer in enumerate(lm.transformer.layers):
            attn = layer.self_attn
            h = layer.norm1(xs)
            qkv = attn.in_proj(h).reshape(batch, 1, 3, self.num_heads, self.head_dim)
            q = self._rope(qkv[:, :, 0].transpose(0, 2, 1, 3), pos)
            k = self._rope(qkv[:, :, 1].transpose(0, 2, 1, 3), pos)
            v = qkv[:, :, 2].transpose(0, 2, 1, 3)
            keys, values = self.keys[i], self.values[i]
            if write_rows is None:
                keys[slot_idx, :, cell_idx] = k[:, :, 0]
                values[slot_idx, :, cell_idx] = v[:, :, 0]
            else:
                keys[slot_idx, :, cell_idx] = k[write_rows, :, 0]
                values[slot_idx, :, cell_idx] = v[write_rows, :, 0]
            self.keys[i], self.values[i] = keys, values
            if all_slots:
                k_rows, v_rows = keys, values
            else:
                k_rows, v_rows = keys[row_idx], values[row_idx]
            if span < self.cells:
                k_rows, v_rows = k_rows[:, :, :span], v_rows[:, :, :span]
            out = mx.fast.scaled_dot_product_attention(q, k_rows, v_rows, scale=attn.scale, mask=mask)
            out = attn.out_proj(out.transpose(0, 2, 1, 3).reshape(batch, 1, -1))
            xs = xs + layer.layer_scale_1(out)
            xs = xs + layer.layer_scale_2(layer.gating(layer.norm2(xs)))
            new_state += [keys, values]

        hidden = lm.out_norm(xs)
        logits = lm.text_linear(hidden)[:, 0]
        tokens = mx.argmax(logits, axis=-1)
        outputs = [tokens]
        vad = None
        if lm.extra_heads:
            vad = mx.stack([mx.softmax(head(hidden), axis=-1)[:, 0, 0] for head in lm.extra_heads],
                           axis=-1).astype(mx.float32)
            outputs.append(vad)
        sample_rows = None
        if want_logits is not None and want_logits.any():
            sample_rows = logits[mx.array(np.flatnonzero(want_logits).astype(np.int32))]
            sample_rows = sample_rows.astype(mx.float32)
            outputs.append(sample_rows)
        # Evaluate the caches with the outputs: mlx is lazy, and the graph must not grow.
        mx.eval(*outputs, *new_state)
        host_logits = None
        if sample_rows is not None and want_logits is not None:
            host_logits = np.zeros((batch, logits.shape[-1]), np.float32)
            host_logits[want_logits] = np.array(sample_rows)
        return StepOutput(
            tokens=np.array(tokens).astype(np.int64),
            logits=host_logits,
            vad=None if vad is None else np.array(vad),
        )
