"""The Mimi encoder, streaming, for any subset of slots at once, each with its own state.

moshi_mlx's `Mimi.encode_step` keeps one streaming state for the whole batch: one KV offset,
no causal mask over the two 25 Hz steps of a frame, a KV cache that grows without bound, no
per-row reset. Kyutai's reference encoders (rustymimi / moshi-core in Rust, PyTorch) are causal
with a window of `context` (250) steps. This module reuses the loaded moshi_mlx `Mimi`'s weights
(SEANet convolutions, transformer, quantizer) and keeps, per slot:
- each streaming convolution's left context (`kernel - stride` input steps); a stream's first
  frame sees zeros, or the first sample repeated for the edge-padded downsample, exactly as a
  fresh encoder;
- the encoder transformer's keys and values in a ring of `context + 2` cells with each cell's
  absolute position, RoPE at per-row positions and a causal mask over the window (the current
  step and `context` before it).
Rows that have no frame this tick keep their state untouched.

On the CPU (measured on a 2-core x86-64 VM with OpenBLAS): weights are made contiguous and the
quantizer's codebooks evaluated once, every layer shares one RoPE table per call, a layer's new
keys and values go to the caches in one scatter each, and float32 ELUs run in numpy (see
`_elu_numpy`): together ~2x faster than the first version at 1 to 8 streams, codes unchanged.

One frame (1920 samples) per row per call: SEANet's strides (4, 5, 6, 8) turn it into two
transformer steps, the downsample into one code frame, so every state keeps a fixed shape.

Everything here runs on the engine thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from moshi_mlx import models
from moshi_mlx.modules.conv import StreamableConv1d
from moshi_mlx.modules.quantization import ResidualVectorQuantizer

from ..errors import UserError

FRAME_SAMPLES = 1920


def _elu_numpy(x: mx.array) -> mx.array:
    """ELU (alpha 1) of a float32 array computed by numpy, for MLX's CPU backend.

    MLX's CPU exp is scalar (~12 ns an element on x86-64: a libm fma per polynomial step), and
    the SEANet's ELUs see ~545 k values per stream per frame: with MLX's they took ~40% of the
    encoder's time at 8 streams. numpy's vectorized exp is ~25x faster. Its last bit differs
    from MLX's on some values; over 178 frames of speech not one code changed, and agreement
    with rustymimi stayed the same (it is computed per element, so a row's result still does
    not depend on its neighbours). This evaluates x: the graph so far runs here.
    """
    values = np.asarray(x)
    negative = np.minimum(values, 0.0)
    np.exp(negative, out=negative)
    negative -= 1.0  # exp(min(x, 0)) - 1: 0 where x >= 0
    return mx.array(np.maximum(values, 0.0) + negative)


@dataclass(frozen=True, slots=True)
class _Conv:
    """One streaming convolution of the encoder, as this module runs it (NLC layout)."""

    weight: mx.array  # (out, kernel, in), row-contiguous
    bias: mx.array | None
    stride: int
    dilation: int
    pad: int  # left context kept per row: effective kernel - stride
    edge: bool  # a stream's first frame is padded with its first sample (else zeros)


def _conv_of(module: StreamableConv1d, edge: bool = False) -> _Conv:
    conv = module.conv.conv
    kernel = (module._ksize - 1) * conv._dilation + 1
    # moshi_mlx loads PyTorch's (out, in, kernel) weights as a transposed view; MLX's conv would
    # copy it to a contiguous layout at every call (~25 ms per frame for the 8.4 M-weight
    # downsampling conv), so copy once.
    return _Conv(mx.contiguous(conv.weight), conv.bias, conv._stride, conv._dilation,
                 kernel - conv._stride, edge)


@dataclass(frozen=True, slots=True)
class _Codebooks:
    """One residual vector quantizer (moshi_mlx's `ResidualVectorQuantizer`), evaluated once."""

    projection: mx.array  # (dim, 1, in) input projection, a 1x1 conv, row-contiguous
    embeddings: list[mx.array]  # per codebook (bins, dim)
    half_norms: list[mx.array]  # per codebook (bins,): |e|^2 / 2


def _codebooks_of(rvq: ResidualVectorQuantizer) -> _Codebooks:
    # moshi_mlx derives each codebook's embedding and norms lazily from its parameters, so an
    # unevaluated graph would recompute them at every call: evaluate them here, once.
    books = [layer.codebook for layer in rvq.vq.layers]
    embeddings = [book._embedding for book in books]
    half_norms = [book._c2 for book in books]
    assert rvq.input_proj is not None
    projection = mx.contiguous(rvq.input_proj.weight)
    mx.eval(embeddings, half_norms, projection)
    return _Codebooks(projection, embeddings, half_norms)


class BatchedMimiEncoder:
    """Per-slot streaming state around a loaded moshi_mlx `Mimi` (weights shared, never copied)."""

    def __init__(self, mimi: models.mimi.Mimi, num_slots: int, dtype: mx.Dtype,
                 fixed_shape: bool = False) -> None:
        """Allocate the per-slot states.

        Args:
            mimi: the codec, weights loaded.
            num_slots: batch slots.
            dtype: compute dtype (the weights are cast to it).
            fixed_shape: compute every slot at every call, rows without a frame masked, so that
                kernels never see a batch size that depends on who is connected (accelerators);
                otherwise only the rows that have a frame are gathered and computed (CPU).
        """
        self.mimi = mimi
        self.num_slots = num_slots
        self.dtype = dtype
        self.fixed_shape = fixed_shape
        enc = mimi.encoder
        convs = [_conv_of(enc.init_conv1d)]
        # SEANet: per layer, residual blocks (conv k3 then k1, with a skip), then a strided conv.
        self._plan: list[tuple[str, int]] = [("conv", 0)]
        for layer in enc.layers:
            for block in layer.residuals:
                assert block.shortcut is None, "only true_skip SEANet blocks are supported"
                first = len(convs)
                convs += [_conv_of(c) for c in block.block]
                self._plan.append(("residual", first))
            convs.append(_conv_of(layer.downsample))
            self._plan.append(("elu_conv", len(convs) - 1))
        convs.append(_conv_of(enc.final_conv1d))
        self._plan.append(("elu_conv", len(convs) - 1))
        convs.append(_conv_of(mimi.downsample.conv, edge=True))
        self._downsample = len(convs) - 1
        self._convs = convs
        channels = [c.weight.shape[-1] for c in convs]
        # Per conv: (slots, pad, in_channels) left context, slot-major.
        self.conv_state = [mx.zeros((num_slots, c.pad, ch), dtype)
                           for c, ch in zip(convs, channels, strict=True)]
        # numpy's exp on the CPU (float32 only); MLX's on accelerators, where it is fast.
        on_cpu = mx.default_device().type == mx.DeviceType.cpu
        self._elu = _elu_numpy if on_cpu and dtype == mx.float32 else partial(nn.elu, alpha=1.0)
        quantizer = mimi.quantizer
        self._quantizers = [_codebooks_of(quantizer.rvq_first), _codebooks_of(quantizer.rvq_rest)]

        tcfg = mimi.cfg.transformer
        self.layers = mimi.encoder_transformer.transformer.layers
        self.num_heads = tcfg.num_heads
        self.head_dim = tcfg.d_model // tcfg.num_heads
        self.context = tcfg.context
        # A query at position p sees the keys at p - context .. p (context + 1 of them, as the
        # reference encoders: rustymimi trims its cache to t + context keys under a causal
        # mask). A frame writes `steps` keys before its first query attends, so the ring holds
        # context + steps cells.
        self.steps = FRAME_SAMPLES // math.prod(mimi.cfg.seanet.ratios)
        self.cells = tcfg.context + self.steps
        shape = (num_slots, self.num_heads, self.cells, self.head_dim)
        self.keys = [mx.zeros(shape, dtype) for _ in self.layers]
        self.values = [mx.zeros(shape, dtype) for _ in self.layers]
        self.cell_pos = np.full((num_slots, self.cells), -1, np.int64)  # -1 = empty
        self.frames_seen = np.zeros(num_slots, np.int64)  # frames encoded since the slot's reset
        half = self.head_dim // 2
        # RoPE angles in float32, as moshi-core computes them whatever the dtype.
        exponents = np.arange(0, half, dtype=np.float32) * 2 / self.head_dim
        inv = 1.0 / (np.float32(tcfg.max_period) ** exponents)
        self._inv_freq = mx.array(inv.astype(np.float32))
        mx.eval(self.conv_state, self.keys, self.values, [c.weight for c in convs])

    def reset_slot(self, slot: int) -> None:
        """Make the slot a fresh encoder: its next frame is a stream's first."""
        self.frames_seen[slot] = 0
        self.cell_pos[slot] = -1

    # ---- pieces ---------------------------------------------------------------------------
    def _conv(self, i: int, x: mx.array, rows: mx.array | None, first: mx.array,
              write: mx.array | None) -> mx.array:
        """One streaming convolution over x (B, L, C) for the batch rows."""
        conv = self._convs[i]
        if conv.pad:
            state = self.conv_state[i]
            prev = state if rows is None else state[rows]
            fresh = mx.repeat(x[:, :1], conv.pad, axis=1) if conv.edge else mx.zeros_like(prev)
            prev = mx.where(first[:, None, None], fresh, prev)
            x = mx.concatenate([prev, x], axis=1)
            tail = x[:, -conv.pad:]
            if rows is None:
                assert write is not None
                self.conv_state[i] = mx.where(write[:, None, None], tail, state)
            else:
                state[rows] = tail
                self.conv_state[i] = state
        y = mx.conv1d(x, conv.weight, stride=conv.stride, dilation=conv.dilation)
        return y if conv.bias is None else y + conv.bias

    def _rope(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        """Interleaved rotary embedding in float32. x: (B, H, T, Dh); cos, sin: (B, 1, T, Dh/2)."""
        xf = x.astype(mx.float32)
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        rotated = mx.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
        return rotated.reshape(x.shape).astype(x.dtype)

    def _quantize(self, x: mx.array) -> mx.array:
        """Codes of x (B, 1, dim): the semantic codebook, then the acoustic residual ones, as
        moshi_mlx's `SplitResidualVectorQuantizer.encode`. Returns (B, n_q) uint32."""
        codes = []
        for books in self._quantizers:
            residual = mx.conv1d(x, books.projection)[:, 0]  # (B, dim)
            for embedding, half_norm in zip(books.embeddings, books.half_norms, strict=True):
                index = (half_norm - residual @ embedding.T).argmin(axis=-1)
                residual = residual - mx.take(embedding, index, axis=0)
                codes.append(index)
        return mx.stack(codes, axis=1)

    # ---- one call -------------------------------------------------------------------------
    def encode(self, slots: np.ndarray, pcm: np.ndarray) -> np.ndarray:
        """Encode one frame for each of `slots`.

        Args:
            slots: (B,) distinct slot indices, ascending.
            pcm: (B, 1920) float32 samples, one frame per slot.

        Returns:
            (B, n_q) int64 codes.
        """
        batch = len(slots)
        if self.fixed_shape:
            # Every slot computes; rows without a frame get silence and write nothing back.
            active = np.zeros(self.num_slots, bool)
            active[slots] = True
            full = np.zeros((self.num_slots, FRAME_SAMPLES), np.float32)
            full[slots] = pcm
            rows: mx.array | None = None
            row_slots = np.arange(self.num_slots)
            write: mx.array | None = mx.array(active)
            first = mx.array(self.frames_seen == 0)
            x = mx.array(full)
        else:
            rows = mx.array(slots.astype(np.int32))
            row_slots = slots
            active = np.ones(batch, bool)
            write = None
            first = mx.array(self.frames_seen[slots] == 0)
            x = mx.array(pcm.astype(np.float32))
        x = x.astype(self.dtype)[:, :, None]  # (B, 1920, 1) NLC

        elu = self._elu
        for kind, i in self._plan:
            if kind == "conv":
                x = self._conv(i, x, rows, first, write)
            elif kind == "elu_conv":
                x = self._conv(i, elu(x), rows, first, write)
            else:  # residual block: conv(elu(x)) -> conv(elu(.)) + x
                h = self._conv(i, elu(x), rows, first, write)
                h = self._conv(i + 1, elu(h), rows, first, write)
                x = x + h
        x = self._transformer(x, row_slots, active, rows)  # (B, 2, 512)
        x = self._conv(self._downsample, x, rows, first, write)  # (B, 1, 512)
        codes = self._quantize(x)  # (B, n_q)
        mx.eval(codes, self.conv_state, self.keys, self.values)
        self.frames_seen[slots] += 1
        out = np.array(codes).astype(np.int64)
        return out[slots] if self.fixed_shape else out

    def _transformer(self, x: mx.array, row_slots: np.ndarray, active: np.ndarray,
                     rows: mx.array | None) -> mx.array:
        """The encoder transformer's two steps of this frame, per row at its own positions."""
        steps = x.shape[1]
        start = self.frames_seen[row_slots] * steps
        positions = start[:, None] + np.arange(steps)[None]  # (B, T) absolute positions
        cells = positions % self.cells
        # Host-side bookkeeping: only rows with a frame fill cells.
        act = np.flatnonzero(active)
        for t in range(steps):
            self.cell_pos[row_slots[act], cells[act, t]] = positions[act, t]
        kpos = self.cell_pos[row_slots][:, None, :]  # (B, 1, cells)
        qpos = positions[:, :, None]  # (B, T, 1)
        valid = (kpos >= 0) & (kpos <= qpos) & (qpos <= kpos + self.context)
        if not active.all():  # rows without a frame attend to something finite; their output is unused
            valid[~active, :, 0] = True
        mask = mx.array(np.where(valid, 0.0, -np.inf)[:, None]).astype(self.dtype)  # (B, 1, T, cells)
        # RoPE angles of this frame's positions, shared by every layer.
        theta = mx.array(positions.astype(np.int32)).astype(mx.float32)[..., None] * self._inv_freq
        cos, sin = mx.cos(theta)[:, None], mx.sin(theta)[:, None]  # (B, 1, T, half)
        # Each active row's new keys go to (its slot, its cell) for every step: one scatter.
        write_rows = mx.array(act.astype(np.int32))
        write_slots = mx.array(np.repeat(row_slots[act], steps).astype(np.int32))
        write_cells = mx.array(cells[act].reshape(-1).astype(np.int32))
        # Rows that are every slot in order (every slot stepping) attend to the caches as they
        # are, without gathering a copy of them.
        gather = rows is not None and not np.array_equal(row_slots, np.arange(self.num_slots))
        batch = x.shape[0]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            qkv = attn.in_proj(layer.norm1(x)).reshape(batch, steps, 3, self.num_heads, self.head_dim)
            q = self._rope(qkv[:, :, 0].transpose(0, 2, 1, 3), cos, sin)  # (B, H, T, Dh)
            # Keys stay (B, T, H, Dh): the layout of the scatter's rows (slot, cell).
            k = self._rope(qkv[:, :, 1], cos.swapaxes(1, 2), sin.swapaxes(1, 2))
            v = qkv[:, :, 2]
            k_new = k if len(act) == batch else k[write_rows]
            v_new = v if len(act) == batch else v[write_rows]
            keys, values = self.keys[i], self.values[i]
            keys[write_slots, :, write_cells] = k_new.reshape(-1, self.num_heads, self.head_dim)
            values[write_slots, :, write_cells] = v_new.reshape(-1, self.num_heads, self.head_dim)
            self.keys[i], self.values[i] = keys, values
            k_rows = keys[rows] if gather else keys
            v_rows = values[rows] if gather else values
            out = mx.fast.scaled_dot_product_attention(q, k_rows, v_rows, scale=attn.scale, mask=mask)
            out = attn.out_proj(out.transpose(0, 2, 1, 3).reshape(batch, steps, -1))
            x = x + layer.layer_scale_1(out)
            x = x + layer.layer_scale_2(layer.gating(layer.norm2(x)))
        return x


def load_mimi(path: str, num_codebooks: int, dtype: mx.Dtype) -> models.mimi.Mimi:
    """moshi_mlx's Mimi with the published checkpoint's weights (PyTorch names), cast to dtype."""
    mimi = models.mimi.Mimi(models.mimi.mimi_202407(num_codebooks))
    try:
        mimi.load_pytorch_weights(path, strict=True)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"Mimi codec {path} cannot be loaded: {exc}") from None
    mimi.set_dtype(dtype)
    mx.eval(mimi.parameters())
    return mimi
