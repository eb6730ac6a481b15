"""Checks of chapter 07 (generation): sampling probabilities and the decode loop; for the exercises,
the repetition penalty, min-p and the log-probability of a sequence.
"""

from __future__ import annotations

import math

import torch

from ..config import GemmaConfig
from ..generate import apply_repetition_penalty, filter_logits
from ..model import Gemma
from .core import Cause, Mismatch, check, expect_close, expect_equal, expect_tensor, randomize_norms


def _reference_probs(logits, temperature, top_k, top_p):
    return filter_logits(logits / temperature, top_k, top_p).softmax(-1)


def _top_p_without_crossing(logits, temperature, top_k, top_p) -> torch.Tensor:
    """Top-p that keeps only tokens with cumulative probability <= p (drops the one crossing p)."""
    probs = _reference_probs(logits, temperature, top_k, None)
    sorted_probs, order = probs.sort(-1, descending=True)
    drop_sorted = sorted_probs.cumsum(-1) > top_p
    kept = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
    return kept / kept.sum(-1, keepdim=True)


def _sampling_causes(logits, temperature, top_k, top_p) -> list[Cause]:
    causes = [
        (
            "temperature: divide the logits by it (you multiplied)",
            lambda: filter_logits(logits * temperature, top_k, top_p).softmax(-1),
        ),
        (
            "filter after the temperature: divide by the temperature first, then apply top-k / top-p",
            lambda: (filter_logits(logits, top_k, top_p) / temperature).softmax(-1),
        ),
    ]
    if top_p is not None:
        causes.append(
            (
                "top-p keeps the smallest set of tokens whose probability reaches p, including the token "
                "that crosses p",
                lambda: _top_p_without_crossing(logits, temperature, top_k, top_p),
            )
        )
    if top_k is not None:
        for k in (top_k - 1, top_k + 1):
            causes.append(
                (
                    f"top-k: keep exactly k = {top_k} tokens (you kept {k})",
                    lambda k=k: _reference_probs(logits, temperature, k, top_p),
                )
            )
    return causes


@check("next_token_probs")
def check_sampling(fn) -> str:
    """fn(logits (B, V), temperature, top_k, top_p) -> probabilities (B, V) to sample from."""
    logits = torch.randn(3, 64) * 2
    cases = (
        (1.0, None, None),
        (0.7, None, None),
        (1.0, 5, None),
        (1.0, None, 0.9),
        (1.5, 20, 0.8),
        (0.5, None, 0.5),
    )
    for temperature, top_k, top_p in cases:
        what = f"probabilities for temperature={temperature}, top_k={top_k}, top_p={top_p}"
        got = expect_tensor(fn(logits.clone(), temperature, top_k, top_p), what)
        if got.shape == logits.shape:
            sums = got.float().sum(-1)
            if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
                row = int((sums - 1).abs().argmax())
                raise Mismatch(
                    f"{what}: row {row} sums to {sums[row].item():.4f}, not 1; renormalize "
                    "after filtering (the softmax of the filtered logits)"
                )
        expect_close(
            got,
            _reference_probs(logits, temperature, top_k, top_p),
            what,
            atol=1e-6,
            causes=_sampling_causes(logits, temperature, top_k, top_p),
        )
    return "temperature, top-k and top-p give the reference probabilities"


def _greedy(model: Gemma, ids: torch.Tensor, n: int, last_only: bool = False) -> list[int]:
    seq, new = ids, []
    for _ in range(n):
        token = int(model(seq[:, -1:] if last_only else seq)[0, -1].argmax())
        new.append(token)
        seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
    return new


@check("generate")
def check_generate(fn) -> str:
    """fn(model, ids (1, T), max_new_tokens, stop_ids=()) -> the new token ids (greedy)."""
    cfg = GemmaConfig.tiny()
    model = randomize_norms(Gemma(cfg))
    model.tok_embed.weight.mul_(0.05)  # else a random tied model just repeats its last token
    ids = torch.randint(3, cfg.vocab_size, (1, 6))
    expected = _greedy(model, ids, 12)
    got = fn(model, ids.clone(), 12)
    got = got.tolist() if isinstance(got, torch.Tensor) else [int(t) for t in got]
    causes = [
        ("one token too many: stop after max_new_tokens", lambda: _greedy(model, ids, 13)),
        ("one token too few: produce max_new_tokens", lambda: expected[:-1]),
        (
            "without a cache, feed the whole sequence at every step, not only the newest token",
            lambda: _greedy(model, ids, 12, last_only=True),
        ),
    ]
    expect_equal(got, expected, "the greedy continuation", causes)

    k = next(i for i, t in enumerate(expected) if i and t not in expected[:i])
    stop = expected[k]
    got = fn(model, ids.clone(), 12, stop_ids={stop})
    got = got.tolist() if isinstance(got, torch.Tensor) else [int(t) for t in got]
    causes = [("the stop token ends the text and is not part of it", lambda: expected[: k + 1])]
    expect_equal(got, expected[:k], f"the continuation with stop_ids={{{stop}}}", causes)
    return "greedy decoding, max_new_tokens and stop tokens behave like the reference loop"


@check("repetition_penalty")
def check_repetition_penalty(fn) -> str:
    """fn(logits (V,), seen_ids (list of ints), penalty) -> new logits; the input is left unchanged."""
    logits = torch.randn(32) * 3
    seen = [3, 7, 7, 12, 20]
    for penalty in (1.3, 2.0):
        original = logits.clone()
        got = fn(logits, seen, penalty)
        if not torch.equal(logits, original):
            raise Mismatch("you changed the caller's logits in place: work on logits.clone()")
        expected = apply_repetition_penalty(logits[None], [torch.tensor(seen)], penalty)[0]
        causes = [
            (
                "negative logits must be multiplied by the penalty (dividing them would raise them)",
                lambda p=penalty: torch.where(
                    torch.isin(torch.arange(32), torch.tensor(seen)), logits / p, logits
                ),
            ),
            (
                "a token seen twice is penalized once",
                lambda p=penalty: apply_repetition_penalty(
                    apply_repetition_penalty(logits[None], [torch.tensor(seen)], p), [torch.tensor([7])], p
                )[0],
            ),
        ]
        expect_close(
            expect_tensor(got, "penalized logits"),
            expected,
            f"penalized logits (penalty {penalty})",
            causes=causes,
        )
    return "seen tokens become less likely, positive and negative logits alike"


def _min_p(logits: torch.Tensor, min_p: float, relative: bool = True) -> torch.Tensor:
    probs = logits.softmax(-1)
    threshold = min_p * probs.max(-1, keepdim=True).values if relative else min_p
    kept = probs.masked_fill(probs < threshold, 0.0)
    return kept / kept.sum(-1, keepdim=True)


@check("min_p_probs")
def check_min_p(fn) -> str:
    """fn(logits (B, V), min_p) -> probabilities keeping tokens with p >= min_p * max p."""
    logits = torch.randn(3, 64) * 2
    for min_p in (0.05, 0.2, 0.5):
        causes = [
            (
                "the threshold is relative: min_p × the top token's probability",
                lambda m=min_p: _min_p(logits, m, relative=False),
            ),
            (
                "renormalize the kept probabilities so they sum to 1",
                lambda m=min_p: logits.softmax(-1).masked_fill(
                    logits.softmax(-1) < m * logits.softmax(-1).max(-1, keepdim=True).values, 0.0
                ),
            ),
        ]
        expect_close(
            fn(logits.clone(), min_p),
            _min_p(logits, min_p),
            f"min_p_probs(logits, {min_p})",
            atol=1e-6,
            causes=causes,
        )
    return "keeps the tokens within min_p of the top one and renormalizes"


def _logprob(model: Gemma, ids: torch.Tensor, start: int, shift: int = 1) -> float:
    logp = model(ids)[0].float().log_softmax(-1)  # (T, V)
    return sum(float(logp[t - shift, ids[0, t]]) for t in range(max(start, shift), ids.shape[1]))


@check("sequence_logprob")
def check_sequence_logprob(fn) -> str:
    """fn(model, ids (1, T), prompt_len) -> sum of log p(ids[t] | ids[:t]) for t >= prompt_len."""
    model = randomize_norms(Gemma(GemmaConfig.tiny()))
    ids = torch.randint(3, model.cfg.vocab_size, (1, 12))
    for prompt_len in (4, 1):
        expected = _logprob(model, ids, prompt_len)
        got = float(fn(model, ids, prompt_len))
        causes = [
            ("the logits at position t - 1 predict token t", lambda s=prompt_len: _logprob(model, ids, s, 0)),
            ("count only the tokens after the prompt", lambda: _logprob(model, ids, 1)),
        ]
        if not math.isclose(got, expected, rel_tol=1e-4, abs_tol=1e-3):
            cause = next((c for c, v in causes if math.isclose(got, v(), rel_tol=1e-4, abs_tol=1e-3)), None)
            raise Mismatch(
                f"sequence_logprob(model, ids, {prompt_len}) is {got:.4f}, expected {expected:.4f}"
                + (f"; likely cause: {cause}" if cause else "")
            )
    return "sums the log-probabilities of the continuation"
