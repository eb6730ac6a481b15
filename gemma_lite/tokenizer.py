"""Gemma's tokenizer on the ``tokenizers`` library.

Gemma 3 uses a SentencePiece-style BPE vocabulary of 262,144 pieces: a space
is written "▁", text is not pre-split into words, and
a character missing from the vocabulary falls back to its UTF-8 bytes
(``<0xE0>`` ...), so no input is ever "unknown".

It is read from a ``tokenizer.json`` (Hugging Face layout) or rebuilt from the
vocabulary stored in a GGUF file. GGUF keeps pieces and scores but no merge
list; the merges are recovered from the vocabulary itself: every way of cutting
a piece in two known pieces is a merge, and pieces earlier in the vocabulary
merge first.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers
from tokenizers.models import BPE

SPACE = "\u2581"  # "▁", SentencePiece's visible space
CONTROL, USER_DEFINED = 3, 4  # GGUF token types


def cache_dir() -> Path:
    """Where rebuilt tokenizers are kept (``$GEMMA_LITE_CACHE`` or ~/.cache/gemma_lite)."""
    return Path(os.environ.get("GEMMA_LITE_CACHE", Path.home() / ".cache" / "gemma_lite"))


class GemmaTokenizer:
    """Text <-> token ids.

    >>> tok.encode("Hello")          # [2, 9259]  (2 is <bos>)
    >>> tok.decode([2, 9259])        # "Hello"    (special tokens are skipped)
    """

    def __init__(self, backend: Tokenizer, bos_id: int = 2, eos_id: int = 1, pad_id: int = 0):
        self.backend = backend
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids, skip_special: bool = True) -> str:
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is out of range: the vocabulary has ids 0..{self.vocab_size - 1}"
            )
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def save(self, path: str | Path) -> None:
        self.backend.save(str(path))

    @classmethod
    def from_file(cls, path: str | Path) -> GemmaTokenizer:
        """Load a Hugging Face ``tokenizer.json``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path} is not a valid tokenizer.json ({e})") from e
        ids = {
            name: backend.token_to_id(tok)
            for name, tok in (("bos_id", "<bos>"), ("eos_id", "<eos>"), ("pad_id", "<pad>"))
        }
        return cls(backend, **{k: v for k, v in ids.items() if v is not None})

    @classmethod
    def from_gguf(cls, metadata: dict) -> GemmaTokenizer:
        """Rebuild the tokenizer from GGUF metadata (cached on disk after the first time)."""
        tokens = metadata["tokenizer.ggml.tokens"]
        types = [int(t) for t in metadata["tokenizer.ggml.token_type"]]
        ids = dict(
            bos_id=int(metadata.get("tokenizer.ggml.bos_token_id", 2)),
            eos_id=int(metadata.get("tokenizer.ggml.eos_token_id", 1)),
            pad_id=int(metadata.get("tokenizer.ggml.padding_token_id", 0)),
        )
        digest = hashlib.sha256("\0".join(tokens).encode())
        digest.update(bytes(types))
        cached = cache_dir() / f"tokenizer-{digest.hexdigest()[:16]}.json"
        if cached.is_file():
            return cls(Tokenizer.from_file(str(cached)), **ids)
        backend = build_sentencepiece_bpe(tokens, types)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        backend.save(str(tmp))
        tmp.replace(cached)
        return cls(backend, **ids)


def bpe_encode(text: str, vocab: dict[str, int], verbose: bool = False) -> list[int]:
    """Token ids of text (no <bos>) by SentencePiece BPE, as a plain Python loop (chapter 1).

    Spaces become "▁"; a character outside the vocabulary becomes one <0xXX> piece per UTF-8
    byte; then the adjacent pair whose merged piece has the smallest id merges, until no
    adjacent pair forms a piece. The tokenizer does the same, much faster. ``verbose`` prints
    the pieces before each merge.
    """
    symbols = []
    for char in text.replace(" ", "▁"):
        symbols += [char] if char in vocab else [f"<0x{byte:02X}>" for byte in char.encode("utf-8")]
    while True:
        if verbose:
            print(" ".join(symbols))
        pairs = [(vocab[a + b], i) for i, (a, b) in enumerate(itertools.pairwise(symbols)) if a + b in vocab]
        if not pairs:
            return [vocab[s] for s in symbols]
        _, i = min(pairs)
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]


def recover_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """All merges the vocabulary implies, best (earliest piece) first.

    A merge (a, b) exists when a, b and a+b are all pieces. Merges producing an
    earlier piece come first; among merges of the same piece, the one with the
    earlier left part, then earlier right part, wins.
    """
    merges = []
    for piece, rank in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((rank, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def build_sentencepiece_bpe(tokens: list[str], types: list[int]) -> Tokenizer:
    """A ``tokenizers`` BPE that tokenizes like Gemma's SentencePiece model."""
    # GGUF spells whitespace-only pieces with real spaces; the model's own spelling is "▁"s.
    pieces = [SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    backend = Tokenizer(
        BPE(vocab=vocab, merges=recover_merges(vocab), unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    backend.normalizer = normalizers.Replace(" ", SPACE)
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    # control tokens (<bos>, <start_of_turn>, ...) and user-defined ones (runs of "\n", HTML tags)
    # are matched whole in the raw text before BPE runs.
    kinds = list(zip(tokens, types, strict=True))
    backend.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t, k in kinds if k == CONTROL]
    )
    backend.add_tokens(
        [AddedToken(t, normalized=False, special=False) for t, k in kinds if k == USER_DEFINED and t in vocab]
    )
    return backend
