"""Memory arithmetic: every byte Gemma 3 needs, predicted from the config.

Predictions are formulas of the config (no model is built):

    parameter_count(cfg)                    parameters per component; .total is 268,098,176
    model_bytes(cfg, dtype)                 the weights
    kv_cache_bytes(cfg, context, dtype)     what ``KVCache`` allocates, with or without the ring buffer
    inference_bytes(cfg, dtype, ...)        working memory of one forward step: activations + logits
    training_memory(cfg, batch, seq, ...)   weights, gradients, Adam, activations, and the peak of a step
    memory_report(cfg, dtype, context)      the table ``python -m gemma_lite memory`` prints

The measurements to hold them against (``TensorMemory``, ``ResidentPeak``)
live in ``measure.py``.

Shape letters as in ``layers.py``: B batch, T tokens, S keys, C model width,
H query heads, K key/value heads, D head dim, F feed-forward width, V vocabulary,
L layers, G = H / K query heads per key/value head. Sizes are in bytes; the
printed tables use MB = 10**6 bytes (``measure.MB``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .config import GemmaConfig
from .devices import dtype_name
from .measure import MB

FP32 = 4  # bytes: optimizer states, norm internals and the loss are kept in fp32
INDEX = 8  # bytes of one int64 slot position in the KV cache


def dtype_bytes(dtype: torch.dtype) -> int:
    """Bytes of one value: 4 for float32, 2 for bfloat16 and float16."""
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ParameterCount:
    """Parameters per component of the whole model (all layers summed)."""

    embedding: int  # V x C token embedding
    attention: int  # q, k, v, o projections and the two QK-norms, every layer
    feed_forward: int  # GeGLU gate, up, down, every layer
    block_norms: int  # the four sandwich norms of every block
    final_norm: int
    output_head: int  # 0: tied to the embedding

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def items(self) -> list[tuple[str, int]]:
        return [(f.name.replace("_", " "), getattr(self, f.name)) for f in fields(self)]


def attention_parameters(cfg: GemmaConfig) -> int:
    """One layer: q (C x HD), k and v (C x KD each), o (HD x C), q_norm and k_norm (D each)."""
    C, H, K, D = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    return C * H * D + 2 * C * K * D + H * D * C + 2 * D


def feed_forward_parameters(cfg: GemmaConfig) -> int:
    """One layer: gate and up (C x F), down (F x C)."""
    return 3 * cfg.d_model * cfg.d_ff


def parameter_count(cfg: GemmaConfig) -> ParameterCount:
    L, C = cfg.n_layers, cfg.d_model
    return ParameterCount(
        embedding=cfg.vocab_size * C,
        attention=L * attention_parameters(cfg),
        feed_forward=L * feed_forward_parameters(cfg),
        block_norms=L * 4 * C,
        final_norm=C,
        output_head=0,
    )


def model_bytes(cfg: GemmaConfig, dtype: torch.dtype) -> int:
    """The weights: every parameter once (the tied head costs nothing)."""
    return parameter_count(cfg).total * dtype_bytes(dtype)


# ---------------------------------------------------------------- KV cache


def kv_cache_bytes(
    cfg: GemmaConfig,
    context: int,
    dtype: torch.dtype,
    batch: int = 1,
    ring: bool = True,
    slack: int = 0,
) -> int:
    """Bytes ``KVCache(cfg, batch, context, dtype, slack=slack)`` allocates, exactly.

    Each layer keeps keys and values, (B, K, slots, D) each, and one int64
    position per slot. Global layers have ``context`` slots; with ``ring``,
    local layers have a ring of ``sliding_window + slack`` slots (at most
    ``context``); without it, every layer keeps ``context`` slots.
    """
    per_slot = 2 * batch * cfg.n_kv_heads * cfg.head_dim * dtype_bytes(dtype) + INDEX
    ring_slots = min(cfg.sliding_window + slack, context)
    slots = sum(context if cfg.is_global(i) or not ring else ring_slots for i in range(cfg.n_layers))
    return slots * per_slot


# ---------------------------------------------------------------- inference


def inference_bytes(cfg: GemmaConfig, dtype: torch.dtype, batch: int = 1, tokens: int = 1) -> dict[str, int]:
    """Working memory of one eager forward of ``tokens`` new tokens (1 = a decode step).

    In inference mode every intermediate is freed as soon as it has been used,
    so the activations never exceed one layer's worth. The largest moment is
    the GeGLU product: the layer's input and output residuals and the norm
    output (3 x (B, T, C)) next to gelu(gate), up and their product
    (3 x (B, T, F)); the RoPE tables (cos, sin for both kinds: 4 x (T, D)) live
    through the whole pass. The logits of the last position, (B, V), come
    after the layers are done, plus an fp32 copy for sampling when the model
    is not fp32: the peak is the larger of the two, not their sum. (A long
    prefill in bf16 can peak higher, in the attention mask's (T, S) position
    arithmetic; chapter 8 shows it.)
    """
    b, T = dtype_bytes(dtype), tokens
    activations = batch * T * (3 * cfg.d_model + 3 * cfg.d_ff) * b + 4 * T * cfg.head_dim * b
    logits = batch * cfg.vocab_size * (b + (FP32 if b != FP32 else 0))
    return {"activations": activations, "logits": logits, "peak": max(activations, logits)}


# ---------------------------------------------------------------- training


def layer_activation_bytes(cfg: GemmaConfig, dtype: torch.dtype, batch: int, seq: int) -> int:
    """What one block saves for the backward pass on a (B, T) batch without a cache.

    Each RMSNorm saves its input and its normalized value in fp32 (it computes
    in fp32) and 1/rms per row: four norms of width C, the QK-norms of HD and KD.
    In the model dtype: the inputs of the q/k/v and gate/up projections (2 C),
    attention's q, output and o_proj input (3 HD), its keys and values (2 KD),
    GeGLU's gate, gelu(gate), up and product (4 F), and the attention mask,
    which SDPA turns into a float (G T x T) tensor. SDPA also keeps its
    log-sum-exp (fp32, one per query row).
    """
    C, H, K, D, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    G, BT, b = H // K, batch * seq, dtype_bytes(dtype)
    norms = BT * (8 * C + 2 * H * D + 2 * K * D + 4 + H + K) * FP32
    model_dtype = BT * (2 * C + 3 * H * D + 2 * K * D + 4 * F) * b
    attention_extras = BT * H * FP32 + G * seq * seq * b
    return norms + model_dtype + attention_extras


def activation_bytes(cfg: GemmaConfig, dtype: torch.dtype, batch: int, seq: int) -> int:
    """Everything a forward pass plus cross-entropy loss saves for the backward pass.

    The layers, the RoPE tables (4 x (T, D)), the final norm (fp32) and the
    head's input, and the fp32 log-probabilities (B, T, V) of the loss: with a
    262k vocabulary, that last one is often the largest of all.
    """
    C, b, BT = cfg.d_model, dtype_bytes(dtype), batch * seq
    return (
        cfg.n_layers * layer_activation_bytes(cfg, dtype, batch, seq)
        + 4 * seq * cfg.head_dim * b
        + BT * (2 * C + 1) * FP32
        + BT * C * b
        + BT * cfg.vocab_size * FP32
    )


@dataclass(frozen=True)
class TrainingMemory:
    """The memory of one training step with Adam(W), and when it peaks.

    ``weights + optimizer`` live all the time. On top of them, three moments
    compete for the peak:

    * backward starts: every saved activation, plus the loss gradients
      (2 x (B, T, V) fp32) or the head's weight gradient (V x C);
    * backward ends: every gradient, plus the embedding's own (V x C) gradient
      before it is added to the head's (the two uses of the tied matrix);
    * the optimizer step: every gradient, plus two temporaries the size of the
      largest parameter (``sqrt(v) / c``, one parameter at a time, as Adam runs
      on CPU; on CUDA its default ``foreach`` version makes one temporary the
      size of all parameters instead, which this estimate does not model).
    """

    parameters: int
    weights: int
    gradients: int
    optimizer: int  # Adam's two moments, plus an fp32 master copy when the weights are not fp32
    activations: int
    backward_start: int
    backward_end: int
    optimizer_step: int

    @property
    def phases(self) -> dict[str, int]:
        return {
            "backward starts": self.backward_start,
            "backward ends": self.backward_end,
            "optimizer step": self.optimizer_step,
        }

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def transient_peak(self) -> int:
        """The peak above what lives between steps (weights and optimizer states)."""
        return max(self.phases.values())

    @property
    def peak(self) -> int:
        return self.weights + self.optimizer + self.transient_peak

    @property
    def per_parameter(self) -> float:
        """Bytes per parameter of weights + gradients + optimizer: the "16N" rule."""
        return (self.weights + self.gradients + self.optimizer) / self.parameters


def training_memory(
    cfg: GemmaConfig, batch: int, seq: int, dtype: torch.dtype = torch.float32
) -> TrainingMemory:
    """Predict a training step on (batch, seq) tokens with Adam, weights and gradients in ``dtype``.

    fp32: 4 (weights) + 4 (gradients) + 8 (two moments) = 16 bytes per parameter.
    bf16 mixed precision: 2 + 2 + 4 (fp32 master copy) + 8 = 16 as well.
    """
    n, b = parameter_count(cfg).total, dtype_bytes(dtype)
    weights, gradients = n * b, n * b
    optimizer = n * (2 * FP32 + (FP32 if b != FP32 else 0))
    tied = cfg.vocab_size * cfg.d_model * b  # one (V, C) gradient
    loss_grads = 2 * batch * seq * cfg.vocab_size * FP32
    activations = activation_bytes(cfg, dtype, batch, seq)
    C = cfg.d_model
    largest = max(cfg.vocab_size * C, C * cfg.d_ff, C * cfg.n_heads * cfg.head_dim)  # elements
    adam_temporaries = 2 * largest * FP32
    return TrainingMemory(
        parameters=n,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        backward_start=activations + max(loss_grads, tied),
        backward_end=gradients + tied,
        optimizer_step=gradients + adam_temporaries,
    )


# ---------------------------------------------------------------- the report


def _mb(nbytes: int) -> str:
    return f"{nbytes / MB:12,.2f} MB"


def memory_report(
    cfg: GemmaConfig,
    dtype: torch.dtype,
    context: int,
    batch: int = 1,
    train_batch: int = 8,
    train_seq: int = 512,
) -> str:
    """The tables ``python -m gemma_lite memory`` prints: parameters, inference, training, KV cache."""
    name = dtype_name(dtype)
    counts = parameter_count(cfg)
    b = dtype_bytes(dtype)
    lines = [f"Parameters ({name}, {b} bytes each)"]
    lines += [f"  {part:<22}{n:>14,}{_mb(n * b)}" for part, n in counts.items()]
    lines.append(f"  {'total':<22}{counts.total:>14,}{_mb(counts.total * b)}")

    kv, kv_flat = (kv_cache_bytes(cfg, context, dtype, batch, ring=r) for r in (True, False))
    step = inference_bytes(cfg, dtype, batch)
    lines += [
        "",
        f"Inference, batch {batch}, context {context:,} tokens",
        f"  {'weights':<36}{_mb(model_bytes(cfg, dtype))}",
        f"  {'KV cache (ring buffer)':<36}{_mb(kv)}",
        f"  {'decode step working memory':<36}{_mb(step['peak'])}",
        f"  {'total':<36}{_mb(model_bytes(cfg, dtype) + kv + step['peak'])}",
        f"  ({'KV cache without the ring buffer:':<34}{_mb(kv_flat)})",
    ]

    train = training_memory(cfg, train_batch, train_seq, dtype)
    lines += [
        "",
        f"Training with Adam, batch {train_batch} x {train_seq} tokens "
        f"({train.per_parameter:.0f} bytes per parameter before activations)",
        f"  {'weights':<36}{_mb(train.weights)}",
        f"  {'gradients':<36}{_mb(train.gradients)}",
        f"  {'Adam moments' + (' + fp32 master' if b != FP32 else ''):<36}{_mb(train.optimizer)}",
        f"  {'activations saved for backward':<36}{_mb(train.activations)}",
        f"  {'peak (' + train.peak_phase + ')':<36}{_mb(train.peak)}",
    ]

    lines += ["", f"KV cache vs context ({name}, batch {batch})"]
    lines.append(f"  {'tokens':>8}{'ring buffer':>18}{'no ring':>18}")
    length = 1024
    while length < context:
        lines.append(_kv_row(cfg, length, dtype, batch))
        length *= 2
    lines.append(_kv_row(cfg, context, dtype, batch))
    return "\n".join(lines)


def _kv_row(cfg: GemmaConfig, context: int, dtype: torch.dtype, batch: int) -> str:
    ring, flat = (kv_cache_bytes(cfg, context, dtype, batch, ring=r) for r in (True, False))
    return f"  {context:>8,}{_mb(ring):>18}{_mb(flat):>18}"
