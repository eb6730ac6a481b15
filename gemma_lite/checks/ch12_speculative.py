"""Checks of the chapter 12 exercises (speculative decoding): the greedy acceptance rule,
the expected speed-up of a configuration, and the tree of candidates with its attention mask."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..speculative import accept_greedy, build_tree, expected_speedup, expected_tokens_per_round
from .core import Mismatch, check, expect_equal, expect_mask

CHAINS = [  # (draft, the model's choice after the root and after each drafted token)
    ([5, 6, 7], [5, 6, 7, 8]),  # all accepted: the model adds an extra token
    ([5, 6, 7], [5, 9, 7, 8]),  # the second guess is wrong: 5, then the model's 9
    ([5, 6, 7], [4, 6, 7, 8]),  # the first guess is wrong: only the model's 4
    ([3], [3, 3]),
    ([2, 2, 2, 2], [2, 2, 1, 2, 2]),
]


def _chain_answer(draft, choices):
    tree = build_tree(-1, [draft])
    path = accept_greedy(tree, choices)
    return tree.path_tokens(path[1:]) + [choices[path[-1]]]


@check("greedy acceptance")
def check_accept_chain(fn: Callable) -> str:
    """fn(draft, choices) -> the tokens the round adds (accepted prefix + the model's next token)."""
    for draft, choices in CHAINS:
        n = len(_chain_answer(draft, choices)) - 1
        causes = [
            (
                "the model's own token after the accepted prefix is missing: a round always adds it",
                lambda d=draft, n=n: d[:n],
            ),
            (
                "a wrong guess must end the round: later tokens were drafted after a wrong one",
                lambda d=draft, c=choices: [t for t, m in zip(d, c, strict=False) if t == m] + [c[len(d)]],
            ),
            (
                "at the first wrong guess, add the model's token (choices[i]), not the drafted one",
                lambda d=draft, n=n, c=choices: d[: n + 1] if n < len(d) else d + [c[-1]],
            ),
            (
                "draft[i] is checked against choices[i] (the model's choice after the tokens before it), "
                "not choices[i + 1]",
                lambda d=draft, c=choices: _chain_answer(d, c[1:] + [c[-1]]),
            ),
        ]
        expect_equal(
            list(fn(list(draft), list(choices))),
            _chain_answer(draft, choices),
            f"fn({draft}, {choices})",
            causes,
        )
    return "the longest agreeing prefix, then the model's own token, as gemma_lite.speculative does"


@check("expected speed-up")
def check_expected_speedup(fn: Callable) -> str:
    """fn(acceptance, draft_len, draft_cost, verify_cost) -> speed-up over plain decoding."""
    for a, K, c, v in [(0.6, 4, 0.02, 1.2), (0.8, 2, 0.0, 1.0), (0.3, 6, 0.05, 1.5), (1.0, 3, 0.01, 1.1)]:
        expected = expected_speedup(a, K, c, v)
        got = fn(a, K, c, v)
        if not isinstance(got, (int, float)):
            raise Mismatch(f"fn({a}, {K}, {c}, {v}) returned {type(got).__name__}; return a number")
        if abs(got - expected) <= 1e-9 * max(1.0, expected):
            continue
        tokens = expected_tokens_per_round(a, K)
        mistakes = [
            (
                "acceptance stops at the first rejection: E = 1 + a + a^2 + ... + a^K, not 1 + a K",
                (1 + a * K) / (K * c + v),
            ),
            (
                "the model's own token is missing: a round adds it after the accepted drafts",
                (tokens - 1) / (K * c + v),
            ),
            ("every drafted token costs draft_cost: K of them per round", tokens / (c + v)),
            ("the draft's cost is missing", tokens / v),
        ]
        cause = next((m for m, value in mistakes if abs(got - value) <= 1e-9 and value != expected), None)
        raise Mismatch(
            f"fn({a}, {K}, {c}, {v}) is {got:.4f}, expected {expected:.4f}"
            + (f"; likely cause: {cause}" if cause else "")
        )
    return (
        f"acceptance 0.6, 4 drafted tokens at 2% of a step, verification 1.2 steps: "
        f"{expected_speedup(0.6, 4, 0.02, 1.2):.2f}x"
    )


TREES = [
    (10, [[1, 2, 3], [1, 2, 4], [5]]),
    (7, [[1], [1], [2, 3]]),  # a repeated candidate adds nothing
    (3, [[4, 5, 6, 7]]),  # one candidate: a chain
    (0, [[1, 2], [3, 2], [1, 4, 5]]),
]


@check("token tree and its mask")
def check_tree_mask(fn: Callable) -> str:
    """fn(root, candidates) -> (tokens, mask (T, T) bool) as ``build_tree`` and ``DraftTree.ancestors``."""
    for root, candidates in TREES:
        tree = build_tree(root, candidates)
        got = fn(root, [list(c) for c in candidates])
        if not (isinstance(got, tuple) and len(got) == 2):
            raise Mismatch("return a pair: (tokens, mask)")
        tokens, mask = got
        flat = [root] + [t for c in candidates for t in c]
        expect_equal(
            list(tokens),
            tree.tokens,
            f"the tokens of root {root}, candidates {candidates}",
            [
                (
                    "candidates that share a prefix share its nodes: add a node only for a new prefix",
                    lambda f=flat: f,
                )
            ],
        )
        expected = tree.ancestors()
        T = len(tree.tokens)
        causes = [
            (
                "a token must also see itself (the diagonal)",
                lambda e=expected, T=T: e & ~torch.eye(T, dtype=torch.bool),
            ),
            (
                "mask[i, j] is True when j is an ancestor of i, not a descendant (transposed)",
                lambda e=expected: e.T.contiguous(),
            ),
            (
                "a causal (lower-triangular) mask lets a token see other candidates' tokens; "
                "only its own path to the root",
                lambda T=T: torch.ones(T, T, dtype=torch.bool).tril(),
            ),
        ]
        expect_mask(mask, expected, f"the mask of root {root}, candidates {candidates}", causes)
    return "shared prefixes merged, and each token sees exactly its path to the root"
