"""Checks of chapter 01 (tokenizer): BPE encoding; for the exercises, byte fallback and decoding pieces."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .core import Mismatch, check, expect_equal

TOKENIZER_SAMPLES = (
    "Hello world",
    "naïve café",
    "Selamat pagi, apa kabar?",
    "สวัสดีครับ ภาษาไทย",
    "  two spaces",
    "𓀀 hieroglyph",
    "tokenization 🦜",
)


def _pieces(tokenizer, ids) -> list[str]:
    return [tokenizer.id_to_token(i) for i in ids]


@check("bpe_encode")
def check_bpe_encode(fn: Callable[[str, dict], list[int]], tokenizer) -> str:
    """fn(text, vocab) -> token ids, as the tokenizer encodes text (no <bos>)."""
    vocab = tokenizer.backend.get_vocab()
    for text in TOKENIZER_SAMPLES:
        expected = tokenizer.encode(text, add_bos=False)
        got = fn(text, vocab)
        got = got.tolist() if isinstance(got, torch.Tensor) else list(got)
        if any(not isinstance(i, int) for i in got):
            raise Mismatch("return token ids (ints, e.g. vocab[piece]), not the pieces themselves")
        if got == expected:
            continue
        i = next(
            (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
            min(len(got), len(expected)),
        )
        yours = repr(tokenizer.id_to_token(got[i])) if i < len(got) else "nothing"
        ref = repr(tokenizer.id_to_token(expected[i])) if i < len(expected) else "nothing"
        hint = "always merge the adjacent pair whose merged piece has the smallest id"
        if " " in text and "▁" not in "".join(_pieces(tokenizer, got)):
            hint = "SentencePiece writes a space as '▁' before merging: text.replace(' ', '▁')"
        elif any(tokenizer.token_to_id(c) is None for c in text.replace(" ", "▁")):
            hint = "a character missing from the vocabulary becomes one <0xXX> piece per UTF-8 byte"
        raise Mismatch(
            f"on {text!r}, token {i} is {yours}, expected {ref}; expected pieces "
            f"{_pieces(tokenizer, expected)}; hint: {hint}"
        )
    return f"agrees with the tokenizer on {len(TOKENIZER_SAMPLES)} texts (English, Indonesian, Thai, bytes)"


FALLBACK_TEXT = "Gemma reads 𓀀 and ꦲꦤ, naïve café, 🦩🦜 and สวัสดี, and 𓀀 again"


def _needs_bytes(tokenizer, char: str) -> bool:
    return any(p.startswith("<0x") for p in _pieces(tokenizer, tokenizer.encode(char, add_bos=False)))


@check("byte_fallback_chars")
def check_byte_fallback_chars(fn, tokenizer) -> str:
    """fn(text, tokenizer) -> the characters spelled with <0xXX> byte pieces, first occurrence order."""
    expected = [c for c in dict.fromkeys(FALLBACK_TEXT) if _needs_bytes(tokenizer, c)]
    got = fn(FALLBACK_TEXT, tokenizer)
    causes = [("list each character once", lambda: [c for c in FALLBACK_TEXT if _needs_bytes(tokenizer, c)])]
    expect_equal(list(got), expected, f"byte_fallback_chars({FALLBACK_TEXT!r})", causes)
    return f"finds the {len(expected)} characters that fall back to bytes"


@check("pieces_to_text")
def check_pieces_to_text(fn: Callable[[list[str]], str], tokenizer) -> str:
    """fn(pieces) -> the text, like tokenizer.decode: '▁' is a space, <0xXX> runs are UTF-8 bytes."""
    for text in ("Hello world", "naïve café", "  two spaces", "𓀀 hieroglyph", "สวัสดี 🦩", "ꦲꦤ"):
        pieces = _pieces(tokenizer, tokenizer.encode(text, add_bos=False))
        causes = [
            ("'▁' is a space: replace it with ' '", lambda p=pieces: "".join(p)),
            (
                "byte pieces: gather consecutive <0xXX> pieces into bytes and decode them together as UTF-8",
                lambda p=pieces: "".join(
                    chr(int(x[3:5], 16)) if x.startswith("<0x") else x for x in p
                ).replace("▁", " "),
            ),
        ]
        expect_equal(fn(pieces), text, f"pieces_to_text({pieces})", causes)
    return "decodes spaces and byte pieces like tokenizer.decode"
