"""A pre-allocated key/value cache with fixed shapes.

Global layers keep a buffer of ``max_len`` slots indexed by position. Local
(sliding-window) layers only ever look 512 tokens back, so they keep a ring of
``window`` slots: position p lives in slot ``p % window``. A 32k-token context
then costs full-length memory in the 3 global layers only.

Every write is an in-place ``index_copy_`` at tensor positions, so the decode
step has the same shapes at every step and compiles once.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from .config import GemmaConfig


class LayerCache(nn.Module):
    """What the two kinds of layer cache hold: keys k and values v (B, K, S, D), and the
    position stored in each slot, slot_pos (S,)."""

    def state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tensors that are this cache: k, v, slot_pos."""
        return self.k, self.v, self.slot_pos

    def over(self, k: torch.Tensor, v: torch.Tensor, slot_pos: torch.Tensor) -> LayerCache:
        """The same kind of cache over other tensors of the same shapes (used, not copied).

        An exported decode step receives its cache as inputs: it wraps them in
        the cache it was built with, so that writing them runs this cache's code.
        """
        other = copy.copy(self)
        other._buffers = {"k": k, "v": v, "slot_pos": slot_pos}
        return other


class GlobalCache(LayerCache):
    """Keys and values of every position so far: slot i holds position i."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("slot_pos", torch.arange(max_len, device=device), persistent=False)

    def update(self, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor):
        """Write k, v (B, K, T, D) at positions input_pos (T,).

        Returns all slots (B, K, S, D) twice and their positions (S,). Slots past
        the newest position hold stale or zero values; the causal mask hides them.
        """
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v, self.slot_pos

    def rollback(self, length: int) -> None:
        """Forget positions >= length. Nothing to do: the causal mask hides them."""

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the keys and values of positions src (n,) to positions dst (n,)."""
        self.k.index_copy_(2, dst, self.k.index_select(2, src))
        self.v.index_copy_(2, dst, self.v.index_select(2, src))


class RingCache(LayerCache):
    """The last ``size`` positions of a sliding-window layer, in a ring.

    ``slot_pos[i]`` is the position stored in slot i, or -1 for an empty slot.
    ``size`` is the window plus ``slack``: the slack keeps a few positions more
    so that the cache can be rolled back (speculative decoding) without losing
    keys the window still needs.
    """

    def __init__(self, batch: int, n_kv_heads: int, size: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, size, head_dim)
        self.size = size
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer(
            "slot_pos", torch.full((size,), -1, dtype=torch.long, device=device), persistent=False
        )

    def update(self, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor):
        """Store k, v (B, K, T, D) of positions input_pos (T,); return what to attend over.

        One new token (a decode step) is written first and the ring returned:
        the key it evicts is ``size`` >= window positions back, which the
        sliding-window mask hides anyway. Returns the ring (B, K, size, D)
        twice and its positions (size,).

        With T > 1 new tokens the earliest of them still need keys that the
        writes evict: the new keys are appended to the ring before it is
        overwritten. Returns keys, values (B, K, size + T, D) and their
        positions (size + T,).
        """
        if k.shape[2] == 1:
            self._write(k, v, input_pos)
            return self.k, self.v, self.slot_pos
        keys = torch.cat([self.k, k], dim=2)
        values = torch.cat([self.v, v], dim=2)
        key_pos = torch.cat([self.slot_pos, input_pos])
        n = min(k.shape[2], self.size)  # only the newest `size` tokens can stay
        self._write(k[:, :, -n:], v[:, :, -n:], input_pos[-n:])
        return keys, values, key_pos

    def _write(self, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor) -> None:
        """Position p goes to slot p % size. k, v (B, K, n, D), input_pos (n,) with n <= size."""
        slots = input_pos % self.size
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        self.slot_pos.index_copy_(0, slots, input_pos)

    def rollback(self, length: int) -> None:
        """Empty the slots holding positions >= length."""
        self.slot_pos.masked_fill_(self.slot_pos >= length, -1)

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the keys and values of positions src (n,) to positions dst (n,)."""
        k, v = self.k.index_select(2, src % self.size), self.v.index_select(2, src % self.size)
        self._write(k, v, dst)


class KVCache(nn.Module):
    """One cache per layer: ``GlobalCache`` for global layers, ``RingCache`` for local ones.

    Memory: global layers 2 * B * K * max_len * D values each, local layers
    2 * B * K * (window + slack) * D each.
    """

    def __init__(
        self,
        cfg: GemmaConfig,
        batch: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        slack: int = 0,
    ):
        super().__init__()
        if not 1 <= max_len <= cfg.max_seq_len:
            raise ValueError(
                f"max_len={max_len} must be between 1 and the model's context ({cfg.max_seq_len})"
            )
        self.max_len = max_len
        ring = min(cfg.sliding_window + slack, max_len)
        dims = (cfg.n_kv_heads,)
        self.layers = nn.ModuleList(
            GlobalCache(batch, *dims, max_len, cfg.head_dim, dtype, device)
            if cfg.is_global(i)
            else RingCache(batch, *dims, ring, cfg.head_dim, dtype, device)
            for i in range(cfg.n_layers)
        )

    def rollback(self, length: int) -> None:
        """Keep positions < length, so that decoding can resume at ``length``."""
        for layer in self.layers:
            layer.rollback(length)

    def keep(self, start: int, nodes: Sequence[int]) -> None:
        """After a forward pass wrote a token tree at slots start, start + 1, ...: keep the
        tree tokens ``nodes`` (a path from the root, in order) as positions start,
        start + 1, ... and forget every other new token. ``nodes`` = 0, 1, ..., n - 1
        (a chain) moves nothing: it is ``rollback(start + n)``.
        """
        moved = [(start + node, start + i) for i, node in enumerate(nodes) if node != i]
        if moved:
            device = self.layers[0].k.device
            src, dst = torch.tensor(moved, device=device).unbind(1)
            for layer in self.layers:
                layer.move(src, dst)
        self.rollback(start + len(nodes))

    def reset(self) -> None:
        self.rollback(0)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())
