"""Model hyper-parameters: the real Gemma 3 270M preset and a tiny preset for tests."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class GemmaConfig:
    """Everything that fixes the shapes and numerics of a Gemma 3 text model.

    Attention layers come in two kinds: *local* (sliding-window, RoPE base 10k)
    and *global* (full causal, RoPE base 1M). Every ``global_every``-th layer is
    global, so Gemma 3 has the 5 local : 1 global pattern.
    """

    vocab_size: int = 262_144
    d_model: int = 640  # hidden size C
    n_layers: int = 18
    n_heads: int = 4  # query heads
    n_kv_heads: int = 1  # key/value heads (grouped-query attention)
    head_dim: int = 256
    d_ff: int = 2048  # GeGLU hidden size
    sliding_window: int = 512  # a local layer sees the current token and the 511 before it
    global_every: int = 6  # layers 5, 11, 17 are global
    rope_local_base: float = 10_000.0
    rope_global_base: float = 1_000_000.0
    max_seq_len: int = 32_768
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 256.0  # attention scores are scaled by this ** -0.5
    bos_id: int = 2
    eos_id: int = 1
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "d_ff", "sliding_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @classmethod
    def gemma3_270m(cls) -> GemmaConfig:
        """The published google/gemma-3-270m configuration."""
        return cls()

    @classmethod
    def tiny(cls, **overrides) -> GemmaConfig:
        """A model of about 256k parameters (255,744) with the same structure, for fast tests.

        Its window is 8 tokens, so a 40-token test prompt already runs well past it.
        """
        small = dict(
            vocab_size=512,
            d_model=64,
            n_layers=6,
            n_heads=4,
            n_kv_heads=2,
            head_dim=16,
            d_ff=128,
            sliding_window=8,
            global_every=3,
            max_seq_len=256,
        )
        return cls(**{**small, **overrides})

    def is_global(self, layer: int) -> bool:
        """True for the full-attention layers (every ``global_every``-th)."""
        return (layer + 1) % self.global_every == 0

    @property
    def layer_kinds(self) -> list[str]:
        """``"global"`` or ``"local"`` for each layer, in order."""
        return ["global" if self.is_global(i) else "local" for i in range(self.n_layers)]

    def replace(self, **changes) -> GemmaConfig:
        return replace(self, **changes)
