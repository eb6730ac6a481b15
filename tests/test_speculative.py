"""Speculative decoding: trees, the tree mask, cache keep/rollback, both acceptance rules, both drafters."""

from __future__ import annotations

import pytest
import torch
from helpers import max_abs_diff, tiny_model_for

from gemma_lite import distill
from gemma_lite.generate import Generator
from gemma_lite.speculative import (
    BUNDLED_DRAFTER,
    PromptLookup,
    RecurrentDrafter,
    SpeculativeGenerator,
    accept_greedy,
    accept_sampled,
    build_tree,
    copy_forward,
    expected_tokens_per_round,
    verify_forward,
)

TOL = 1e-4
PROMPT = "the cat sat on the mat; the cat sat on the hat; the dog sat"  # past the tiny model's 8-token window


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_for()


def random_head(model, seed=0, vocab=None):
    torch.manual_seed(seed)
    vocab = torch.arange(3, 60) if vocab is None else vocab
    head = RecurrentDrafter(model.cfg.d_model, vocab).bind(model)
    with torch.no_grad():
        for p in head.mlp[2].parameters():  # a head that proposes varied, wrong tokens
            p.normal_(0.0, 0.5)
    return head


# ---------------------------------------------------------------- trees


def test_build_tree_shares_prefixes_and_pads():
    tree = build_tree(5, [[7, 8, 1], [7, 9], [4]], size=9)
    assert tree.tokens[:6] == [5, 7, 8, 1, 9, 4]
    assert tree.parents[:6] == [-1, 0, 1, 2, 1, 0]
    assert tree.depth[:6] == [0, 1, 2, 3, 2, 1]
    assert tree.padding == 3 and tree.size == 9
    anc = tree.ancestors()
    assert anc[3].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert anc[4].nonzero().flatten().tolist() == [0, 1, 4]
    assert anc[6].nonzero().flatten().tolist() == [6]  # padding sees only itself
    with pytest.raises(ValueError, match="more than the fixed size"):
        build_tree(5, [[1, 2], [3, 4]], size=3)


def test_greedy_acceptance_follows_the_models_choices():
    tree = build_tree(5, [[7, 8, 1], [7, 9]])
    assert accept_greedy(tree, [7, 9, 0, 0, 3]) == [0, 1, 4]  # 7 agreed, then 9 (second branch)
    assert accept_greedy(tree, [6, 0, 0, 0, 0]) == [0]  # the first guess is wrong: the root alone
    assert accept_greedy(tree, [7, 8, 1, 2, 0]) == [0, 1, 2, 3]  # the whole first branch


def test_prompt_lookup_copies_what_followed_the_last_match():
    lookup = PromptLookup(max_ngram=2)
    assert lookup.propose([1, 2, 3, 4, 9, 2, 3], None, 3, 1) == [[4, 9, 2]]
    assert lookup.propose([5, 6, 7], None, 3, 1) == []  # nothing repeats
    assert copy_forward([1, 2, 1, 2], 2, 5) == [1, 2, 1, 2, 1]  # a copy that runs into itself
    assert lookup.propose([1, 2, 8, 1, 2, 9, 1, 2], None, 2, 2) == [[9, 1], [8, 1]]  # most recent first


def test_expected_tokens_per_round():
    assert expected_tokens_per_round(0.0, 4) == 1.0
    assert expected_tokens_per_round(1.0, 4) == 5.0
    assert abs(expected_tokens_per_round(0.5, 2) - 1.75) < 1e-12


# ---------------------------------------------------------------- the model on a tree


@torch.no_grad()
def test_tree_pass_gives_each_candidate_the_logits_of_running_it_alone(tiny):
    """The tree mask verifies exactly the candidate set: every node as if its path ran on its own."""
    model, tok = tiny
    context = tok.encode(PROMPT)  # 60 tokens: the local layers' window (8) is long past
    candidates = [[40, 41, 42], [40, 43], [44, 45, 46, 47], [44, 45, 50]]
    root = 30
    tree = build_tree(root, candidates, size=14)
    cache = model.new_cache(1, 128, slack=tree.size)
    T = len(context)
    model(torch.tensor([context]), torch.arange(T), cache)
    ids = torch.tensor([tree.tokens])
    logits, _ = verify_forward(model, ids, torch.arange(T, T + tree.size), cache, tree.token_tree("cpu"))
    for candidate in candidates:
        alone = model(torch.tensor([context + [root] + candidate]))[0, T:]  # (len + 1, V)
        node, nodes = 0, [0]
        for token in candidate:
            node = tree.children[node][token]
            nodes.append(node)
        assert max_abs_diff(logits[nodes], alone) <= TOL, candidate


@torch.no_grad()
@pytest.mark.parametrize("keep_branch", [0, 1, 3])
def test_cache_after_keep_equals_a_run_that_never_saw_the_rejected_tokens(tiny, keep_branch):
    """Verify a tree, keep one path (moving its keys when it is not the first branch), decode on."""
    model, tok = tiny
    context = tok.encode(PROMPT)
    candidates = [[40, 41, 42], [40, 43, 44], [45, 46], [47, 48, 49]]
    tree = build_tree(30, candidates)
    cache = model.new_cache(1, 128, slack=tree.size)
    T = len(context)
    model(torch.tensor([context]), torch.arange(T), cache)
    verify_forward(
        model, torch.tensor([tree.tokens]), torch.arange(T, T + tree.size), cache, tree.token_tree("cpu")
    )
    kept = candidates[keep_branch][:2]
    path = [0]
    for token in kept:
        path.append(tree.children[path[-1]][token])
    cache.keep(T, path)
    follow = [52, 53, 54, 55, 56, 57, 58, 59, 60, 61]  # long enough to wrap the rings again
    start = T + len(path)
    after = model(torch.tensor([follow]), torch.arange(start, start + len(follow)), cache)
    clean = model(torch.tensor([context + [30] + kept + follow]))[:, start:]
    assert max_abs_diff(after, clean) <= TOL


# ---------------------------------------------------------------- greedy: same tokens as plain decoding


@torch.no_grad()
@pytest.mark.parametrize("drafter_name", ["lookup", "redrafter"])
@pytest.mark.parametrize("draft_len,width", [(1, 1), (4, 1), (3, 3)])
def test_greedy_speculative_equals_greedy_decoding(tiny, drafter_name, draft_len, width):
    model, tok = tiny
    drafter = PromptLookup() if drafter_name == "lookup" else random_head(model)
    plain = Generator(model, tok)(PROMPT, 50, stop_at_eos=False)
    spec = SpeculativeGenerator(model, tok, drafter, draft_len=draft_len, width=width)(
        PROMPT, 50, stop_at_eos=False
    )
    assert spec.new_ids == plain.new_ids and spec.text == plain.text
    stats = spec.stats
    assert stats.tokens >= 49 and stats.rounds == len(stats.accepted)
    assert all(1 <= a <= draft_len + 1 for a in stats.accepted)
    assert stats.verified <= stats.beam_tokens


@torch.no_grad()
def test_stop_strings_and_max_tokens_cut_a_round(tiny):
    model, tok = tiny
    plain = Generator(model, tok)(PROMPT, 30, stop_at_eos=False)
    spec = SpeculativeGenerator(model, tok, PromptLookup(), draft_len=5)
    for n in (1, 2, 7):
        assert spec(PROMPT, n, stop_at_eos=False).new_ids[0] == plain.new_ids[0][:n]
    stop = plain.text[0][10:13]
    expected = Generator(model, tok)(PROMPT, 30, stop=[stop], stop_at_eos=False).text
    assert spec(PROMPT, 30, stop=[stop], stop_at_eos=False).text == expected


@pytest.mark.compile
@torch.no_grad()
def test_compiled_verification_gives_the_same_tokens(tiny):
    model, tok = tiny
    plain = Generator(model, tok)(PROMPT, 40, stop_at_eos=False)
    gen = SpeculativeGenerator(model, tok, random_head(model), draft_len=3, width=2, compile=True)
    for _ in range(2):  # the second call reuses the compiled pass
        assert gen(PROMPT, 40, stop_at_eos=False).new_ids == plain.new_ids


# ---------------------------------------------------------------- sampling: the model's distribution


def total_variation(counts: dict, probs: dict, n: int) -> float:
    keys = set(counts) | set(probs)
    return 0.5 * sum(abs(counts.get(k, 0) / n - probs.get(k, 0.0)) for k in keys)


@torch.no_grad()
def exact_joint(model, prompt_ids, sampling, depth: int, prefix=()) -> dict:
    """The model's exact probability of every sequence of ``depth`` sampled tokens after the prompt."""
    from gemma_lite.speculative import model_probs

    p = model_probs(model(torch.tensor([prompt_ids + list(prefix)]))[:, -1], sampling)[0]
    out = {}
    for t in p.nonzero().flatten().tolist():
        if depth == 1:
            out[(*prefix, t)] = float(p[t])
        else:
            for seq, q in exact_joint(model, prompt_ids, sampling, depth - 1, (*prefix, t)).items():
                out[seq] = float(p[t]) * q
    return out


@torch.no_grad()
@pytest.mark.parametrize("drafter_name", ["lookup", "redrafter"])
def test_speculative_sampling_has_the_models_distribution(tiny, drafter_name, monkeypatch):
    """1,500 samples of the two tokens the rounds add after the prefill's token: their frequencies are
    within a total variation of 0.08 of the model's exact distribution (top-3 sampling, so at most 9
    outcomes: the sampling noise of 1,500 draws is about 0.03). A drafter that is wrong most of the
    time is in use, so a rule that accepts every draft, or resamples from p instead of
    max(0, p - q), is far off (checked below on the first)."""
    from gemma_lite.generate import Sampling

    model, tok = tiny
    drafter = PromptLookup() if drafter_name == "lookup" else random_head(model, seed=3)
    prompt = "ababab ab"
    gen = SpeculativeGenerator(model, tok, drafter, draft_len=2)
    sampling = Sampling(temperature=1.5, top_k=3)
    exact = {}
    for seq, prob in exact_joint(model, tok.encode(prompt), sampling, 3).items():
        exact[seq[1:]] = exact.get(seq[1:], 0.0) + prob  # the two tokens after the prefill's

    def frequencies(n=1500):
        counts = {}
        for seed in range(n):
            out = gen(prompt, 3, temperature=1.5, top_k=3, seed=seed, stop_at_eos=False)
            key = tuple(out.new_ids[0][1:3])
            counts[key] = counts.get(key, 0) + 1
        return counts

    assert total_variation(frequencies(), exact, 1500) < 0.08
    accept_all = lambda draft, p, q, rng=None: [
        *draft,
        int(torch.multinomial(p[len(draft)], 1, generator=rng)),
    ]
    monkeypatch.setattr("gemma_lite.speculative.accept_sampled", accept_all)
    assert total_variation(frequencies(500), exact, 500) > 0.15


def test_accept_sampled_resamples_from_the_residual():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.0, 1.0, 0.0]])
    rng = torch.Generator().manual_seed(0)
    outcomes = [accept_sampled([1], p, q, rng) for _ in range(2000)]
    rejected = [o for o in outcomes if len(o) == 1]
    assert all(o == [0] for o in rejected)  # max(0, p - q) has all its mass on token 0
    assert abs(len(rejected) / 2000 - 0.5) < 0.05  # accepted with probability p/q = 0.5


# ---------------------------------------------------------------- errors, distillation, files


def test_clear_errors(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="draft_len"):
        SpeculativeGenerator(model, tok, PromptLookup(), draft_len=0)
    with pytest.raises(ValueError, match="sliding window"):
        SpeculativeGenerator(model, tok, PromptLookup(), draft_len=model.cfg.sliding_window)
    gen = SpeculativeGenerator(model, tok, PromptLookup())
    with pytest.raises(ValueError, match="one prompt at a time"):
        gen(["a", "b"], 4)
    with pytest.raises(ValueError, match="repetition_penalty"):
        gen("a", 4, repetition_penalty=1.2)
    with pytest.raises(FileNotFoundError, match="distill"):
        RecurrentDrafter.from_file("/no/such/head.safetensors")


def test_distillation_learns_the_models_next_tokens_and_round_trips(tiny, tmp_path):
    model, tok = tiny
    model.requires_grad_(False)
    seeds = distill.seed_prompts(model, tok, 8, seed_tokens=3)
    assert len(seeds) == 8 and all(seeds)
    data = distill.write_texts(model, tok, seeds, length=24, batch=4, top=16, progress=False)
    assert data.tokens.shape == (8, 24) and data.hidden.shape == (8, 24, model.cfg.d_model)
    assert torch.equal(data.top_ids[..., 0], data.tokens)  # greedy: each token is the model's top logit
    training, held_out = data.split(0.25)
    vocab = distill.choose_vocab(training, 40)
    torch.manual_seed(0)
    head = RecurrentDrafter(model.cfg.d_model, vocab).bind(model)
    history = distill.train(head, training, steps=60, batch=64, draft_len=3, lr=3e-3, progress=False)
    first, last = (torch.tensor(history[s]).mean(0) for s in (slice(0, 5), slice(-5, None)))
    assert last[0] < 0.7 * first[0] and last[1] >= first[1]  # KL down, agreement not down
    agreement = distill.held_out_agreement(head, held_out, 3)
    assert len(agreement) == 3 and all(0.0 <= a <= 1.0 for a in agreement)
    with torch.no_grad():  # the file stores fp16: round first, then the loaded head must propose the same
        for p in head.parameters():
            p.copy_(p.half().float())
    path = tmp_path / "head.safetensors"
    head.save(path)
    again = RecurrentDrafter.from_file(path, model)
    context = data.tokens[0, :10].tolist()
    hidden = data.hidden[0, 9]
    assert again.propose(context, hidden, 3, 2) == head.propose(context, hidden, 3, 2)


# ---------------------------------------------------------------- the real model


LONG_PROMPT = (
    "Here is a short history of the printing press, told slowly. " * 60
    + "In short, the printing press changed"
)
PROMPTS = ["The capital of France is", "def fibonacci(n):\n", LONG_PROMPT]


@pytest.fixture(scope="module")
def real_plain(real):
    model, tok = real
    gen = Generator(model, tok)
    return {p: gen(p, 40, stop_at_eos=False).new_ids for p in PROMPTS}


@torch.no_grad()
@pytest.mark.parametrize(
    "drafter_name,draft_len,width", [("lookup", 4, 1), ("redrafter", 4, 1), ("redrafter", 3, 3)]
)
def test_real_model_greedy_speculative_equals_greedy(real, real_plain, drafter_name, draft_len, width):
    model, tok = real
    assert len(tok.encode(LONG_PROMPT)) > 512
    drafter = PromptLookup() if drafter_name == "lookup" else RecurrentDrafter.bundled(model)
    gen = SpeculativeGenerator(model, tok, drafter, draft_len=draft_len, width=width)
    for prompt in PROMPTS:
        out = gen(prompt, 40, stop_at_eos=False)
        assert out.new_ids == real_plain[prompt], prompt[:40]
        assert out.stats.mean_accepted >= 1.0


def test_bundled_head_fits_the_real_model(real):
    model, _ = real
    head = RecurrentDrafter.bundled(model)
    assert BUNDLED_DRAFTER.stat().st_size < 16e6
    assert 1000 <= len(head.vocab) <= 8192 and int(head.vocab.max()) < model.cfg.vocab_size
    assert head.out_rows.shape == (len(head.vocab), model.cfg.d_model)


# ---------------------------------------------------------------- the chapter's checks


def test_check_accept_chain_passes_and_names_mistakes(capsys):
    from helpers import fails, passes

    from gemma_lite import checks

    def right(draft, choices):
        n = 0
        while n < len(draft) and draft[n] == choices[n]:
            n += 1
        return draft[:n] + [choices[n]]

    passes(checks.check_accept_chain(right), capsys)
    fails(checks.check_accept_chain(lambda d, c: right(d, c)[:-1]), capsys, "own token")
    fails(
        checks.check_accept_chain(
            lambda d, c: [t for t, m in zip(d, c, strict=False) if t == m] + c[len(d) :]
        ),
        capsys,
        "end the round",
    )


def test_check_expected_speedup_passes_and_names_mistakes(capsys):
    from helpers import fails, passes

    from gemma_lite import checks

    def tokens(a, K):
        return sum(a**i for i in range(K + 1))

    passes(checks.check_expected_speedup(lambda a, K, c, v: tokens(a, K) / (K * c + v)), capsys)
    fails(
        checks.check_expected_speedup(lambda a, K, c, v: (1 + a * K) / (K * c + v)), capsys, "first rejection"
    )
    fails(checks.check_expected_speedup(lambda a, K, c, v: tokens(a, K) / v), capsys, "draft's cost")


def test_check_tree_mask_passes_and_names_mistakes(capsys):
    from helpers import fails, passes

    from gemma_lite import checks

    def right(root, candidates):
        tree = build_tree(root, candidates)
        return tree.tokens, tree.ancestors()

    passes(checks.check_tree_mask(right), capsys)
    fails(
        checks.check_tree_mask(lambda r, c: (right(r, c)[0], right(r, c)[1].T.contiguous())),
        capsys,
        "transposed",
    )
    fails(
        checks.check_tree_mask(lambda r, c: ([r] + [t for x in c for t in x], None)), capsys, "share a prefix"
    )
    eye = lambda r, c: (right(r, c)[0], right(r, c)[1] & ~torch.eye(len(right(r, c)[0]), dtype=torch.bool))
    fails(checks.check_tree_mask(eye), capsys, "diagonal")
