"""Gemma 3 as one module: embedding, 18 blocks, final norm, tied output head."""

from __future__ import annotations

import torch
from torch import nn

from .config import GemmaConfig
from .devices import device_of, dtype_of
from .kv_cache import KVCache
from .layers import Block, RMSNorm, RotaryEmbedding, ScaledEmbedding, TokenTree


class Gemma(nn.Module):
    """The Gemma 3 text model.

    ``model(input_ids)`` runs a whole sequence and returns logits (B, T, V).
    With a ``KVCache`` and ``input_pos`` it runs only the new tokens, reading
    and extending the cache; the forward pass is the same code either way.
    """

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embed = ScaledEmbedding(cfg.vocab_size, cfg.d_model)
        self.rope = nn.ModuleDict(
            {
                "local": RotaryEmbedding(cfg.head_dim, cfg.rope_local_base),
                "global": RotaryEmbedding(cfg.head_dim, cfg.rope_global_base),
            }
        )
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)

    @property
    def device(self) -> torch.device:
        return device_of(self)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype: the parameters' (the norms', when the matrices are quantized)."""
        return dtype_of(self)

    def num_parameters(self) -> int:
        """Unique parameters (the output head shares the embedding matrix)."""
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch: int = 1, max_len: int | None = None, slack: int = 0) -> KVCache:
        """A cache on the model's device and dtype, for up to ``max_len`` positions.

        Also computes the RoPE tables for those positions, once, so that cached
        forward passes only read them.
        """
        max_len = max_len or self.cfg.max_seq_len
        cache = KVCache(self.cfg, batch, max_len, self.dtype, self.device, slack=slack)
        for rope in self.rope.values():
            rope.build_tables(max_len, self.device)
        return cache

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) token ids
        input_pos: torch.Tensor | None = None,  # (T,) positions; default 0..T-1
        cache: KVCache | None = None,
        valid_from: torch.Tensor | None = None,  # (B,) first real position of left-padded rows
        last_only: bool = False,  # logits of the last position only: (B, 1, V)
        check_inputs: bool = True,  # False: the caller has validated ids and positions (no device sync)
        tree: TokenTree | None = None,  # the new tokens form a tree: input_pos are their cache slots
        return_hidden: bool = False,  # also return the final-norm hidden states (B, T, C)
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # (B, T, V) logits in the model dtype
        if input_pos is None:
            if cache is not None:
                raise ValueError("pass input_pos (the positions of input_ids) when using a cache")
            input_pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        if not torch.compiler.is_compiling() and check_inputs:  # (no guard on check_inputs)
            self._check_inputs(input_ids, input_pos, cache)

        x = self.tok_embed(input_ids)  # (B, T, C)
        # Positions index cache slots; RoPE counts from each row's first real token,
        # so a left-padded prompt is rotated exactly as it would be on its own.
        rope_pos = input_pos if valid_from is None else (input_pos[None] - valid_from[:, None]).clamp(min=0)
        if tree is not None:  # a token of a tree sits at the first new slot plus its depth
            rope_pos = input_pos[0] + tree.depth
        max_len = None if cache is None else cache.max_len  # with a cache, read the RoPE tables
        rope = {kind: self.rope[kind](rope_pos, x.dtype, max_len) for kind in ("local", "global")}
        # A one-token step builds its two masks (local, global) in the first layer of
        # each kind and reuses them; longer inputs build them per layer, so that
        # (T, S) masks do not stay alive through the whole pass.
        masks = {} if input_ids.shape[1] == 1 else None
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache.layers[i]
            extra = {} if tree is None else {"tree": tree}
            x = block(x, rope[block.kind], input_pos, layer_cache, valid_from, masks, **extra)
        if last_only:
            x = x[:, -1:]
        x = self.final_norm(x)
        logits = self.output_head(x)
        return (logits, x) if return_hidden else logits

    def output_head(self, x: torch.Tensor) -> torch.Tensor:
        """Tied head: logits = x @ E^T with the embedding matrix E (V, C)."""
        return self.tok_embed.logits(x)  # (B, T, V)

    def _check_inputs(self, input_ids, input_pos, cache) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        if input_ids.device != self.device:
            raise ValueError(
                f"input_ids are on {input_ids.device} but the model is on {self.device}; "
                f"move them with input_ids.to('{self.device}')"
            )
        if input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(
                    f"token id {hi if hi >= self.cfg.vocab_size else lo} is out of range: "
                    f"this model's vocabulary has ids 0..{self.cfg.vocab_size - 1}"
                )
        if input_pos.shape != input_ids.shape[1:]:
            raise ValueError(
                f"input_pos has shape {tuple(input_pos.shape)}, expected ({input_ids.shape[1]},)"
            )
        limit = cache.max_len if cache is not None else self.cfg.max_seq_len
        if input_ids.shape[1] and int(input_pos.max()) >= limit:
            what = "the cache's max_len" if cache is not None else "the model's context"
            raise ValueError(
                f"position {int(input_pos.max())} is beyond {what} ({limit} positions); "
                "use a shorter prompt or fewer new tokens"
            )
