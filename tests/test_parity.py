"""Our model against the reference implementation, transformers' ``Gemma3ForCausalLM``.

* tiny config, random weights (fast): the same weights in both, logits within
  1e-4, on a 40-token sequence that runs 5x past the 8-token window, with
  transformers' "eager" and "sdpa" attention.
* real weights (slow): both built from the same bundled GGUF (transformers
  dequantizes it with ``gguf`` itself), fp32, default "sdpa" attention;
  logits within 1e-4 on English, Indonesian, Thai, code, and a prompt longer
  than the 512-token sliding window; greedy generation token for token; the
  parameter count.

The measured differences are printed (run with ``-s``) and kept as junit
properties (``record_property``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import max_abs_diff, ours_from_hf, random_hf_model

from gemma_lite import GemmaConfig
from gemma_lite.generate import Generator

pytest.importorskip("transformers")

TOLERANCE = 1e-4

_FACTS = [
    "The Nile flows north through eleven countries before it reaches the Mediterranean Sea.",
    "Jakarta adalah kota terbesar di Indonesia dan pusat ekonomi negara itu.",
    "กรุงเทพมหานครเป็นเมืองหลวงและนครที่มีประชากรมากที่สุดของประเทศไทย",
    "for i in range(10):\n    print(i * i)",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "Gunung Bromo adalah gunung berapi aktif di Jawa Timur.",
    "The recipe needs 200 g of flour, 3 eggs, and a pinch of salt.",
]
PROMPTS = {
    "english": "The capital of France is Paris, and the capital of Germany is",
    "indonesian": "Bahasa Indonesia adalah bahasa resmi Republik Indonesia dan dituturkan oleh",
    "thai": "ภาษาไทยเป็นภาษาราชการของประเทศไทย มีผู้พูดมากกว่า",
    "code": 'def fibonacci(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n',
    # numbered lines of mixed text: about 700 tokens, past the 512-token sliding window
    "long": "\n".join(f"{i + 1}. {_FACTS[(3 * i) % len(_FACTS)]}" for i in range(36)),
}


# ---------------------------------------------------------------- tiny config, random weights

@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_tiny_random_weights_match_transformers(attn_implementation, record_property):
    cfg = GemmaConfig.tiny()
    hf = random_hf_model(cfg, attn_implementation)
    ours = ours_from_hf(hf, cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    assert ids.shape[1] > 4 * cfg.sliding_window

    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
        diff = max_abs_diff(got, expected)
        # the comparison can see the window: without it the logits are far off
        for block in ours.blocks:
            if block.attn.window is not None:
                block.attn.window = None
        unwindowed = max_abs_diff(ours(ids), expected)

    print(f"\n[parity] tiny config ({attn_implementation}): 40 tokens, max |logit diff| = {diff:.3g}")
    record_property(f"tiny_{attn_implementation}_max_abs_diff", diff)
    assert got.shape == expected.shape == (2, 40, cfg.vocab_size)
    assert diff <= TOLERANCE, f"tiny config: max |logit diff| {diff:.3g} > {TOLERANCE}"
    assert unwindowed > 100 * TOLERANCE, "dropping the sliding window should change the logits"


# ---------------------------------------------------------------- real weights

@pytest.mark.slow
@pytest.mark.parametrize("name", list(PROMPTS))
def test_real_logits_match_transformers(name, real, hf_model, record_property):
    model, tokenizer = real
    ids = torch.tensor([tokenizer.encode(PROMPTS[name])])
    if name == "long":
        assert 600 <= ids.shape[1] <= 1000, ids.shape
        assert ids.shape[1] > model.cfg.sliding_window
    with torch.no_grad():
        got = model(ids)
        expected = hf_model(ids).logits
    diff = max_abs_diff(got, expected)
    print(f"\n[parity] {name}: {ids.shape[1]} tokens, max |logit diff| = {diff:.3g}")
    record_property(f"{name}_tokens", ids.shape[1])
    record_property(f"{name}_max_abs_diff", diff)
    assert got.shape == expected.shape
    assert diff <= TOLERANCE, f"{name} ({ids.shape[1]} tokens): max |logit diff| {diff:.3g} > {TOLERANCE}"
    # the same next token everywhere, not just close numbers
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.slow
def test_parameter_count(real, hf_model):
    model, _ = real
    assert model.num_parameters() == 268_098_176
    assert model.num_parameters() == hf_model.num_parameters()


@pytest.mark.slow
@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "no-cache"])
@pytest.mark.parametrize("prompt", ["The capital of France is", "Resep nasi goreng yang enak:"])
def test_greedy_generation_matches_transformers(prompt, use_cache, real, hf_model):
    model, tokenizer = real
    ids = torch.tensor([tokenizer.encode(prompt)])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        out = hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
            pad_token_id=tokenizer.pad_id,
        )
    expected = out[0, ids.shape[1]:].tolist()
    if expected and expected[-1] == tokenizer.eos_id:
        expected = expected[:-1]  # transformers keeps the EOS it stopped at; we do not

    result = Generator(model, tokenizer, use_cache=use_cache)(prompt, 32)
    assert result.new_ids[0] == expected
    assert len(expected) == 32, "pick a prompt that does not stop early: the test should cover 32 tokens"
