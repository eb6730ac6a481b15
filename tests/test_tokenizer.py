"""Our tokenizer (rebuilt from the GGUF vocabulary) against transformers' GGUF tokenizer.

The corpus covers many scripts, emoji sequences, whitespace runs, code,
control tokens and characters that only exist as byte fallback; on top of the
hand-written strings, random mixes of their pieces (fixed seed) probe the
boundaries between them.
"""

from __future__ import annotations

import random

import pytest

pytestmark = pytest.mark.slow  # the real 262k vocabulary, and transformers' tokenizer

HAND_WRITTEN = [
    # Latin, English and Indonesian
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "It's a well-known fact: naïve café owners don't résumé-check.",
    "Saya suka makan nasi goreng dengan telur mata sapi.",
    "Selamat pagi! Apa kabar? Semoga harimu menyenangkan.",
    "Pemerintah Indonesia mengumumkan kebijakan baru untuk mengurangi emisi karbon pada tahun 2030.",
    "Ketidakberdayaan, mempertanggungjawabkan, dipersatukan, keanekaragaman.",
    "Straße, Größe, Äpfel, Öl, Übermut — und „Anführungszeichen“.",
    "Ça va? Où est la bibliothèque? L'œuvre d'art est là-bas.",
    "¿Dónde está el baño? ¡Muchas gracias, señor!",
    "Zażółć gęślą jaźń. Příliš žluťoučký kůň úpěl ďábelské ódy.",
    "Türkçe: ığüşöç İĞÜŞÖÇ; Tiếng Việt: Xin chào các bạn, cảm ơn nhiều.",
    # Cyrillic, Greek, Armenian, Georgian
    "Привет, мир! Как дела?",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Ελληνικά: Γειά σου Κόσμε! Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "Բարեւ աշխարհ, ქართული ენა",
    # right-to-left
    "مرحبا بالعالم! كيف حالك اليوم؟",
    "اللغة العربية هي إحدى أكثر اللغات انتشاراً في العالم.",
    "שלום עולם! מה שלומך?",
    "עברית: אני אוהב לתכנת בפייתון.",
    "فارسی: سلام دنیا",
    # Indic
    "नमस्ते दुनिया! आप कैसे हैं?",
    "हिन्दी भारत की राजभाषा है।",
    "বাংলা ভাষা, தமிழ் மொழி, తెలుగు, ಕನ್ನಡ, മലയാളം, ગુજરાતી, ਪੰਜਾਬੀ",
    # Thai and Southeast Asia
    "สวัสดีครับ ยินดีต้อนรับสู่ประเทศไทย",
    "ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ จึงตัดคำได้ยาก",
    "กรุงเทพมหานคร อมรรัตนโกสินทร์ มหินทรายุทธยา",
    "ພາສາລາວ, ភាសាខ្មែរ, မြန်မာဘာသာ",
    # CJK and Korean
    "你好，世界！今天天气很好。",
    "機器學習是人工智慧的一個分支。",
    "日本語のテキスト：こんにちは、世界。カタカナとひらがな。",
    "東京都渋谷区で会議があります。",
    "안녕하세요, 세계! 한국어 문장입니다.",
    "대한민국의 수도는 서울입니다.",
    "中文、日本語、한국어 mixed with English words.",
    # emoji: plain, skin tones, ZWJ sequences, flags, keycaps, variation selectors
    "I love pizza 🍕 and sushi 🍣!",
    "👍👍🏻👍🏼👍🏽👍🏾👍🏿",
    "👩‍💻 👨‍👩‍👧‍👦 🧑🏽‍🚀 👩🏿‍❤️‍💋‍👨🏻",
    "🏳️‍🌈 🏴‍☠️ 🇮🇩 🇹🇭 🇯🇵 🇺🇸",
    "1️⃣ 2️⃣ #️⃣ ❤️ ☺️ ✌🏾",
    "😀😃😄😁😆😅🤣😂🙂🙃",
    "🫠🫨🪿🦩",
    # whitespace
    " ",
    "  ",
    "    ",
    "\t",
    "\n",
    "\n\n",
    "\n\n\n\n\n\n\n\n\n\n",
    "\r\n",
    " \n \n ",
    "\t\t\tindented with tabs",
    "word    with    four    spaces",
    "a  b   c    d     e      f       g        h",
    " leading space",
    "   leading spaces",
    "trailing space ",
    "trailing spaces   ",
    "  both sides  ",
    "line one\nline two\n\nline four\n",
    "mixed \t \n \r whitespace",
    "\u00a0non-breaking\u00a0spaces\u00a0",
    "\u3000ideographic space\u3000",
    "zero\u200bwidth\u200cjoiner\u200dand\ufeffbom",
    # code
    "def f(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;",
    '{"key": "value", "list": [1, 2, 3], "nested": {"a": null}}',
    "<div class=\"container\"><p>Hello</p></div>",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); }",
    "const add = (a, b) => a + b; // arrow function",
    "x = [i**2 for i in range(10) if i % 2 == 0]",
    "fn main() { let v: Vec<u32> = vec![1, 2, 3]; }",
    "$ pip install -e '.[test]' && pytest -q -m 'not slow'",
    "    if (a != b && c <= d || !e) { return; }",
    "https://example.com/path?query=1&other=%20x#frag",
    "user@example.org, C:\\Windows\\System32\\drivers",
    # numbers and symbols
    "3.14159265358979323846",
    "1,234,567.89 and 1.234.567,89",
    "2024-03-15T12:34:56Z",
    "€100, £50, ¥1000, ₹500, $20.00, ₿0.001",
    "∀x ∈ ℝ: x² ≥ 0, ∑ᵢ aᵢ = ∫ f(x) dx ≈ π",
    "→ ← ↑ ↓ ⇒ ⇔ ∞ ≠ ≤ ≥ ± × ÷",
    "!!!???...,,,;;;:::",
    "(((nested))) [[[brackets]]] {{{braces}}}",
    "____underscores____ ----dashes---- ====equals====",
    # control and special tokens
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
    "<bos>text after bos",
    "text before eos<eos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "  <start_of_turn>  spaces around  <end_of_turn>  ",
    "<pad><pad>",
    "<unk>",
    "<mask>",
    "<start_of_image>",
    "not a <start_of_turn control token> in the middle",
    "<start_of_turn",
    "start_of_turn>",
    "<b>bold</b> <i>italic</i> <br>",
    # byte fallback: private use, rare CJK extensions, unpaired combining marks, controls
    "\ue000",
    "\ue000\ue001\uf8ff",
    "private use \U000f0000 plane 15",
    "𠀀𠀁𠀂",
    "rare CJK ext-B: 𪚥 𠮷 𡈽",
    "\u0301",
    "\u0301\u0302\u0303 unpaired combining marks",
    "e\u0301 vs é",
    "a\u0308\u0304\u0323 stacked marks",
    "\x00\x01\x02\x1f\x7f",
    "bell\x07 and escape\x1b[0m",
    "\ufffd replacement char",
    "\U0001d54f\U0001d552\U0001d55d math letters",
    "𓀀𓀁 hieroglyphs, ᚠᚢᚦ runes, ꦗꦮ Javanese",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ１２３",
    "ﬁ ﬂ ligatures and ½ ¼ fractions",
    "Å Å Ω Ω (composed and decomposed)",
    # long and repetitive
    "a" * 200,
    "ab" * 150,
    " " * 100,
    "ha" * 40 + "!",
    "😂" * 30,
    "ไทย" * 50,
    "lorem ipsum dolor sit amet " * 20,
]

_PIECES = [
    " ", "  ", "\t", "\n", "\n\n", "the", " cat", "Indonesia", " adalah", "ภาษา", "ไทย", "你好", "世界",
    "안녕", "Привет", "γειά", "مرحبا", "שלום", "नमस्ते", "👍🏽", "👨‍👩‍👧", "🇮🇩", "\ue000", "𠀀", "\u0301",
    "def", "()", "{", "}", "    return", "0", "42", "3.14", "<start_of_turn>", "<end_of_turn>", "<eos>",
    "é", "ß", "ı", "_", "-", ".", "!?", "\u200d", "\u00a0", "'", '"', "\\", "/", "%", "`",
]


def random_mixes(n: int, seed: int = 0) -> list[str]:
    """``n`` strings of 1 to 12 random pieces glued together (deterministic)."""
    rng = random.Random(seed)
    return ["".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 12))) for _ in range(n)]


CORPUS = HAND_WRITTEN + random_mixes(150)
CONTROL_TOKENS = ["<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
# matched whole, but ordinary text: kept by decode
USER_DEFINED_TOKENS = ["<start_of_image>", "<end_of_image>", "<b>", "\n\n\n"]


def _first_mismatches(pairs, limit: int = 5) -> str:
    return "\n".join(f"  {text!r}: ours {a}, reference {b}" for text, a, b in pairs[:limit])


def test_corpus_is_varied():
    print(f"\n[tokenizer] corpus: {len(CORPUS)} strings ({len(HAND_WRITTEN)} hand-written)")
    assert len(CORPUS) >= 200
    assert len(set(CORPUS)) > 0.95 * len(CORPUS)


def test_ids_match_reference(tokenizer, hf_tokenizer):
    bad = []
    for text in CORPUS:
        ours = tokenizer.encode(text, add_bos=False)
        theirs = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        if ours != theirs:
            bad.append((text, ours, theirs))
    assert not bad, f"{len(bad)} of {len(CORPUS)} strings tokenize differently:\n{_first_mismatches(bad)}"


def test_bos_matches_reference(tokenizer, hf_tokenizer):
    """With special tokens, both put <bos> (id 2) first and nothing at the end."""
    for text in ["Hello", "", " ", "<start_of_turn>user\nhi<end_of_turn>\n", HAND_WRITTEN[20]]:
        ours = tokenizer.encode(text)
        assert ours == hf_tokenizer(text)["input_ids"], repr(text)
        assert ours[0] == tokenizer.bos_id == hf_tokenizer.bos_token_id == 2
        assert ours[1:] == tokenizer.encode(text, add_bos=False)


def test_decode_roundtrip(tokenizer):
    bad = []
    for text in CORPUS:
        ids = tokenizer.encode(text, add_bos=False)
        if tokenizer.decode(ids, skip_special=False) != text:
            bad.append((text, ids, tokenizer.decode(ids, skip_special=False)))
        elif not any(t in text for t in CONTROL_TOKENS) and tokenizer.decode(ids) != text:
            bad.append((text, ids, tokenizer.decode(ids)))
    assert not bad, f"{len(bad)} strings do not survive encode/decode:\n{_first_mismatches(bad)}"


def test_decode_matches_reference(tokenizer, hf_tokenizer):
    bad = []
    for text in CORPUS:
        ids = tokenizer.encode(text)
        ours, theirs = tokenizer.decode(ids), hf_tokenizer.decode(ids, skip_special_tokens=True)
        if ours != theirs:
            bad.append((text, ours, theirs))
    assert not bad, f"{len(bad)} strings decode differently:\n{_first_mismatches(bad)}"


def test_control_tokens_are_single_ids(tokenizer, hf_tokenizer):
    for token in CONTROL_TOKENS:
        ids = tokenizer.encode(token, add_bos=False)
        assert ids == [hf_tokenizer.convert_tokens_to_ids(token)], token
        assert tokenizer.decode(ids) == ""  # skipped by default
        assert tokenizer.decode(ids, skip_special=False) == token
    assert tokenizer.decode(tokenizer.encode("<start_of_turn>user\nhi<end_of_turn>")) == "user\nhi"
    for token in USER_DEFINED_TOKENS:
        ids = tokenizer.encode(token, add_bos=False)
        assert ids == [hf_tokenizer.convert_tokens_to_ids(token)], repr(token)
        assert tokenizer.decode(ids) == token == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_byte_fallback(tokenizer):
    """A character outside the vocabulary becomes its UTF-8 bytes, never <unk>.

    (U+E000 and a few hundred other private-use characters are pieces of their own.)
    """
    for char in ["\U000f0000", "\U0002a6a5", "\U00020000", "\U00013000"]:  # plane-15 PUA, CJK ext-B, 𓀀
        assert tokenizer.token_to_id(char) is None
        ids = tokenizer.encode(char, add_bos=False)
        pieces = [tokenizer.id_to_token(i) for i in ids]
        assert pieces == [f"<0x{b:02X}>" for b in char.encode("utf-8")], (char, pieces)
        assert tokenizer.decode(ids) == char


def test_vocabulary(tokenizer, hf_tokenizer):
    assert tokenizer.vocab_size == len(hf_tokenizer) == 262_144
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (
        hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id)


def test_decode_rejects_out_of_range_ids(tokenizer):
    for bad in (tokenizer.vocab_size, 10**9, -1):
        with pytest.raises(ValueError, match=rf"token id {bad} is out of range.*0\.\.262143"):
            tokenizer.decode([5, bad])


def test_encode_rejects_non_text(tokenizer):
    with pytest.raises(TypeError, match="expects a str"):
        tokenizer.encode([1, 2, 3])
