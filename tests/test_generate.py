"""Sampling rules, the decode loop's options, and parity of generated text with HF transformers."""

from __future__ import annotations

import pytest
import torch
from helpers import CharTokenizer, max_abs_diff, tiny_model_for

from gemma_lite import Gemma
from gemma_lite.generate import (
    Generator,
    IncrementalText,
    RowTracker,
    Sampling,
    StepGenerator,
    apply_repetition_penalty,
    decode_step,
    filter_logits,
    generate,
)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_for()


def package_caches(model: Gemma):
    """``new_caches`` for a StepGenerator: the package's caches, one per layer."""
    return lambda batch, max_len: list(model.new_cache(batch, max_len).layers)


# ---------------------------------------------------------------- sampling rules


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=0), "top_k must be an integer >= 1"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    ],
)
def test_invalid_sampling_values_raise_clear_errors(tiny, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)
    with pytest.raises(ValueError, match=message):
        Generator(*tiny)("hi", 4, **kwargs)


def test_invalid_lengths_raise_clear_errors(tiny):
    gen = Generator(*tiny)
    context = tiny[0].cfg.max_seq_len
    with pytest.raises(ValueError, match="exceeds the model's context"):
        gen("x" * (context - 5), 10)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        gen("hi", 0)
    with pytest.raises(ValueError, match="at least one token"):
        gen([[]], 3)


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    kept = lambda out: (out > float("-inf")).nonzero()[:, 1].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2, top_p=None)) == [0, 1]
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, ...
    assert kept(filter_logits(logits, None, top_p=float(probs[0]) - 0.01)) == [0]
    assert kept(filter_logits(logits, None, top_p=float(probs[0] + probs[1]) - 0.01)) == [0, 1]
    assert kept(filter_logits(logits, None, top_p=1.0)) == [0, 1, 2, 3, 4]
    shuffled = logits[:, [3, 0, 4, 1, 2]]  # order must not matter
    assert kept(filter_logits(shuffled, top_k=2, top_p=0.99)) == [1, 3]


def test_repetition_penalty_matches_transformers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    logits = torch.randn(2, 50)
    seen = torch.randint(0, 50, (2, 12))
    reference = transformers.RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    ours = apply_repetition_penalty(logits, list(seen), 1.3)
    assert max_abs_diff(reference, ours) == 0


# ---------------------------------------------------------------- the loop


def test_seeded_sampling_is_reproducible(tiny):
    gen = Generator(*tiny)
    options = dict(temperature=1.0, top_k=20, top_p=0.95, seed=123, stop_at_eos=False)
    first, again = gen("abc", 24, **options), gen("abc", 24, **options)
    other = gen("abc", 24, **{**options, "seed": 7})
    assert first.new_ids == again.new_ids
    assert first.new_ids != other.new_ids
    greedy = gen("abc", 24, stop_at_eos=False)
    assert greedy.new_ids == gen("abc", 24, top_k=5, stop_at_eos=False).new_ids  # top_k alone keeps greedy


def test_stop_ids_and_stop_strings(tiny):
    gen = Generator(*tiny)
    free = gen("abc", 30, stop_at_eos=False)
    first = free.new_ids[0][5]
    stopped = gen("abc", 30, stop=[first], stop_at_eos=False)
    assert stopped.new_ids[0] == free.new_ids[0][: free.new_ids[0].index(first)]
    text = free.text[0]
    marker = text[8:10]
    cut = gen("abc", 30, stop=[marker], stop_at_eos=False)
    assert cut.text[0] == text[: text.index(marker)]


def test_streaming_pieces_add_up_to_the_text(tiny):
    pieces = []
    result = Generator(*tiny)("abc", 20, stop_at_eos=False, on_text=pieces.append)
    assert len(pieces) > 1
    assert "".join(pieces) == result.text[0]


def test_should_stop_interrupts(tiny):
    calls = []
    result = Generator(*tiny)(
        "abc", 50, stop_at_eos=False, should_stop=lambda: calls.append(1) or len(calls) >= 3
    )
    assert len(result.new_ids[0]) == 3


class ByteTokenizer:
    """Id 3 + b is the byte b: a character of several UTF-8 bytes takes several tokens."""

    pad_id, eos_id, bos_id = 0, 1, 2

    def encode(self, text):
        return [3 + b for b in text.encode()]

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


def test_streaming_holds_back_a_half_decoded_character():
    text = "né à 5€, 🙂!"
    tokenizer, pieces = ByteTokenizer(), []
    rows = RowTracker(tokenizer, 1, set(), [], on_text=pieces.append)
    for token in tokenizer.encode(text):
        rows.add([token])
    assert rows.finish() == [text]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert len(pieces) == len(text)  # one piece per character, as soon as it is whole


def test_incremental_text_releases_an_unfinished_character_at_the_end():
    tokenizer = ByteTokenizer()
    text = IncrementalText(tokenizer)
    pieces = [text.add(t) for t in tokenizer.encode("a€")[:-1]]  # the euro sign's last byte is missing
    assert pieces == ["a", "", ""] and text.rest() == "\ufffd"


def test_stop_string_across_pieces_ends_the_row_and_cuts_its_text():
    tokenizer, pieces = CharTokenizer(), []
    rows = RowTracker(tokenizer, 2, set(), ["cd"], on_text=pieces.append)
    row0, row1 = tokenizer.encode("abcdef", add_bos=False), tokenizer.encode("xyzxyz", add_bos=False)
    for pair in zip(row0, row1, strict=True):
        rows.add(list(pair))
    assert rows.running == [False, True]
    assert rows.finish() == ["ab", "xyzxyz"]
    assert "".join(pieces) == "abc"  # "c" was streamed before "d" showed that it starts the stop string


def test_inputs_are_checked_once_per_call_not_per_step(tiny, monkeypatch):
    calls = []
    check = Gemma._check_inputs
    monkeypatch.setattr(Gemma, "_check_inputs", lambda *args: calls.append(1) or check(*args))
    for use_cache in (True, False):
        calls.clear()
        result = Generator(*tiny, use_cache=use_cache)("abc", 10, stop_at_eos=False)
        assert len(result.step_times) == 9 and len(calls) == 1


def test_decode_speed_counts_only_rows_still_running(tiny):
    gen = Generator(*tiny)
    free = gen(["abc", "hello"], 10, stop_at_eos=False)
    first = free.new_ids[0][0]
    assert first not in free.new_ids[1]  # the stop id below ends row 0 only
    result = gen(["abc", "hello"], 10, stop=[first], stop_at_eos=False)
    assert result.new_ids == [[], free.new_ids[1]]
    assert result.decode_tokens == len(result.step_times) == 9
    assert result.decode_tok_s == pytest.approx(9 / result.decode_s)


@pytest.mark.parametrize("use_cache", [True, False])
def test_batch_of_different_lengths_equals_one_by_one(tiny, use_cache):
    gen = Generator(*tiny, use_cache=use_cache)
    prompts = ["a", "hello there", "four"]
    batch = gen(prompts, 15, stop_at_eos=False)
    for i, prompt in enumerate(prompts):
        assert batch.new_ids[i] == gen(prompt, 15, stop_at_eos=False).new_ids[0], prompt


def test_generate_returns_text_for_text(tiny):
    assert isinstance(generate(*tiny, "abc", 5), str)
    assert len(generate(*tiny, ["abc", "de"], 5)) == 2


# ---------------------------------------------------------------- the real model vs HF


@pytest.mark.slow
def test_greedy_200_tokens_after_a_long_prompt_match_transformers(real, hf_model):
    """A 600-token prompt (past the 512 window), 200 greedy tokens: identical ids."""
    model, tokenizer = real
    text = "In 1865, the city council met to discuss the new bridge over the river. " * 60
    prompt = tokenizer.encode(text)[:600]
    ours = Generator(model, tokenizer)(prompt, 200, stop_at_eos=False).new_ids[0]
    with torch.inference_mode():
        hf = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=200, min_new_tokens=200, do_sample=False, pad_token_id=0
        )
    assert ours == hf[0, 600:].tolist()


@pytest.mark.slow
def test_real_batch_matches_single_prompts(real):
    model, tokenizer = real
    prompts = ["The capital of France is", "Semut adalah serangga yang hidup dalam koloni, dan"]
    gen = Generator(model, tokenizer)
    batch = gen(prompts, 16)
    for i, p in enumerate(prompts):
        assert batch.new_ids[i] == gen(p, 16).new_ids[0]


@pytest.mark.slow
def test_bf16_generation_peak_memory_under_1gb():
    """A whole bf16 generation (load + 64 tokens with the KV cache), in a fresh process."""
    import subprocess
    import sys

    from helpers import python_env

    code = (
        "import gemma_lite\n"
        "from gemma_lite.generate import Generator\n"
        "m, t = gemma_lite.load(dtype='bfloat16', device='cpu', progress=False)\n"
        "Generator(m, t)('The capital of France is', 64)\n"
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=python_env(), check=True
    )
    peak_kib = int(out.stdout.strip().splitlines()[-1])
    print(f"bf16 generation peak: {peak_kib / 1024:.0f} MiB")
    assert peak_kib * 1024 < 1e9


# ---------------------------------------------------------------- a decode step of one's own


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.compile)])
def test_a_step_generator_chooses_the_generators_tokens(tiny, compile):
    model, tokenizer = tiny
    prompt = "a prompt longer than the window"  # the tiny model's window is 8: the rings wrap
    step = decode_step
    if compile:
        step = lambda *args: decode_step(*args)  # noqa: E731 (a function of its own to compile)
    mine = StepGenerator(model, tokenizer, step, package_caches(model), compile=compile)
    expected = Generator(model, tokenizer)(prompt, 12, stop_at_eos=False)
    for _ in range(2):  # a second generation gets fresh caches
        got = mine(prompt, 12, stop_at_eos=False)
        assert got.new_ids == expected.new_ids
    assert len(got.step_times) == 11 and got.decode_tok_s > 0


def test_a_step_generator_refuses_prompts_of_different_lengths(tiny):
    model, tokenizer = tiny
    mine = StepGenerator(model, tokenizer, decode_step, package_caches(model), compile=False)
    with pytest.raises(ValueError, match="prompts of one length"):
        mine(["short", "a longer one"], 4)
