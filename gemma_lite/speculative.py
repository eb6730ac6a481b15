"""Speculative decoding: a cheap drafter guesses, the model checks several tokens in one pass.

    drafter = PromptLookup()                           # or RecurrentDrafter.bundled(model)
    gen = SpeculativeGenerator(model, tokenizer, drafter, draft_len=4)
    out = gen("The capital of France is", max_new_tokens=64)
    out.text[0], out.stats.mean_accepted              # same text as plain greedy decoding

A decode step reads every weight once to produce one token, so on a
memory-bound device a pass over 5 tokens costs little more than a pass over
one. Each *round* (Leviathan et al., "Fast Inference from Transformers via
Speculative Decoding", https://arxiv.org/abs/2211.17192; Chen et al.,
"Accelerating Large Language Model Decoding with Speculative Sampling",
https://arxiv.org/abs/2302.01318):

1. the drafter proposes continuations of the text (one, or several that share
   prefixes: a *tree*, as in Apple's ReDrafter, Cheng et al., "Recurrent
   Drafter for Fast Speculative Decoding in Large Language Models",
   https://arxiv.org/abs/2403.09919);
2. the model runs the tree's tokens in one forward pass, each token attending
   to the cached context and to its own ancestors only (``layers.tree_mask``);
3. greedy: keep the longest path the model's own argmax agrees with, plus the
   model's next token; sampling: accept drafted token x with probability
   min(1, p(x) / q(x)), else resample from max(0, p - q) and stop; either way
   the text has exactly the model's distribution;
4. the cache keeps the accepted path and forgets the rest (``KVCache.keep``).

Speculative decoding here runs one prompt at a time (batch 1).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import native
from .fast import set_embedding_layout
from .generate import Generation, Generator, Sampling, filter_logits, next_token
from .kv_cache import KVCache
from .layers import TokenTree
from .model import Gemma

BUNDLED_DRAFTER = Path(__file__).parent / "data" / "redrafter.safetensors"

# ---------------------------------------------------------------- trees of candidates


@dataclass
class DraftTree:
    """Candidate continuations merged where they share a prefix.

    Node 0 is the root: the last token chosen, not yet in the cache. Every
    other node is a drafted token below its parent; nodes are numbered so that
    a parent comes before its children. ``padding`` nodes (added to reach a fixed
    size for a compiled pass) hang nowhere and are never accepted.
    """

    tokens: list[int]
    parents: list[int]  # -1 for the root and for padding
    depth: list[int]
    children: list[dict[int, int]]  # token -> child node
    padding: int = 0

    @property
    def size(self) -> int:
        return len(self.tokens)

    def ancestors(self) -> torch.Tensor:
        """(T, T) bool: [i, j] is True when node j is node i or one of its ancestors."""
        T = self.size
        mask = torch.eye(T, dtype=torch.bool)
        for i in range(T):
            j = self.parents[i]
            while j >= 0:
                mask[i, j] = True
                j = self.parents[j]
        return mask

    def token_tree(self, device) -> TokenTree:
        """What the model's forward pass needs: depths (T,) and the ancestor mask (T, T)."""
        depth = torch.tensor(self.depth, dtype=torch.long, device=device)
        return TokenTree(depth, self.ancestors().to(device))

    def path_tokens(self, path: Sequence[int]) -> list[int]:
        return [self.tokens[n] for n in path]


def build_tree(root: int, candidates: Sequence[Sequence[int]], size: int | None = None) -> DraftTree:
    """Merge candidate continuations of ``root`` into a tree; pad it to ``size`` nodes if given.

    >>> build_tree(5, [[7, 8], [7, 9]]).tokens     # the shared 7 is verified once
    [5, 7, 8, 9]
    """
    tree = DraftTree(tokens=[root], parents=[-1], depth=[0], children=[{}])
    for candidate in candidates:
        node = 0
        for token in candidate:
            child = tree.children[node].get(token)
            if child is None:
                child = tree.size
                tree.children[node][token] = child
                tree.tokens.append(token)
                tree.parents.append(node)
                tree.depth.append(tree.depth[node] + 1)
                tree.children.append({})
            node = child
    if size is not None:
        if tree.size > size:
            raise ValueError(f"the candidates make {tree.size} tree nodes, more than the fixed size {size}")
        tree.padding = size - tree.size
        for _ in range(tree.padding):
            tree.tokens.append(0)
            tree.parents.append(-1)
            tree.depth.append(0)
            tree.children.append({})
    return tree


# ---------------------------------------------------------------- acceptance rules


def accept_greedy(tree: DraftTree, choices: Sequence[int]) -> list[int]:
    """The path of nodes the model agrees with, from the root.

    ``choices[i]`` is the model's argmax after node i. Follow the child whose
    token is the model's choice while there is one; the model's choice after
    the last node is the extra token every round gains.
    """
    path = [0]
    while (child := tree.children[path[-1]].get(choices[path[-1]])) is not None:
        path.append(child)
    return path


def accept_sampled(
    draft: Sequence[int],
    p: torch.Tensor,  # (K + 1, V) the model's distribution after the root and after each drafted token
    q: torch.Tensor | None,  # (K, V) the distributions the draft was sampled from; None: chosen, not sampled
    rng: torch.Generator | None = None,
) -> list[int]:
    """Speculative sampling: the tokens this round adds, distributed exactly as the model's own.

    Drafted token x_i is kept with probability min(1, p_i(x) / q_i(x)); at the
    first rejection the replacement comes from max(0, p_i - q_i), renormalised,
    and the round ends. If every drafted token is kept, one more comes from
    p_K. A draft that was chosen rather than sampled has q_i = 1 at x_i.
    """
    out: list[int] = []
    device = p.device
    for i, x in enumerate(draft):
        px = float(p[i, x])
        qx = 1.0 if q is None else float(q[i, x])
        if float(torch.rand((), generator=rng, device=device)) * qx < px:  # u < p/q, without dividing
            out.append(int(x))
            continue
        if q is None:
            residual = p[i].clone()
            residual[x] = 0.0
        else:
            residual = (p[i] - q[i]).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: any sample of p will do
            residual = p[i]
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=rng)))
        return out
    out.append(int(torch.multinomial(p[len(draft)], 1, generator=rng)))
    return out


def model_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution sampling draws from: temperature, then top-k / top-p. (N, V) -> (N, V) fp32."""
    scaled = logits.float() / sampling.temperature
    return filter_logits(scaled, sampling.top_k, sampling.top_p).softmax(-1)


def expected_tokens_per_round(acceptance: float, draft_len: int) -> float:
    """Tokens a round yields when each drafted token is accepted with probability ``acceptance``.

    (1 - a^(K+1)) / (1 - a): the accepted prefix plus the model's own token.
    """
    if acceptance >= 1.0:
        return draft_len + 1.0
    return (1 - acceptance ** (draft_len + 1)) / (1 - acceptance)


def expected_speedup(acceptance: float, draft_len: int, draft_cost: float, verify_cost: float = 1.0) -> float:
    """Speed-up over plain decoding: tokens per round / the round's cost in model steps.

    A round drafts ``draft_len`` tokens at ``draft_cost`` steps each and runs one
    verification pass of ``verify_cost`` steps (about 1 when decoding is
    memory-bound; more where the extra tokens' arithmetic shows).
    """
    return expected_tokens_per_round(acceptance, draft_len) / (draft_len * draft_cost + verify_cost)


# ---------------------------------------------------------------- drafters


class Drafter:
    """Proposes continuations of the text; subclasses fill in ``propose``.

    ``context`` is the whole text so far (prompt and generated ids, the root
    last); ``hidden`` the model's final hidden state (C,) at the position that
    chose the root.
    """

    name = "drafter"
    needs_hidden = False

    def propose(self, context: list[int], hidden: torch.Tensor | None, draft_len: int, width: int):
        """Up to ``width`` continuations of up to ``draft_len`` tokens each (maybe none)."""
        raise NotImplementedError

    def propose_sampled(
        self, context: list[int], hidden, draft_len: int, sampling: Sampling, rng
    ) -> tuple[list[int], torch.Tensor | None]:
        """One continuation and the distributions (K, V) it was sampled from (None: chosen outright)."""
        candidates = self.propose(context, hidden, draft_len, 1)
        return (list(candidates[0]) if candidates else []), None


class PromptLookup(Drafter):
    """Drafts by copying: find the last n tokens earlier in the text, propose what followed.

    No training and no model: it shines when the output repeats its input
    (summaries, edits, code, extraction) and rarely fires on free prose.
    n goes from ``max_ngram`` down to ``min_ngram`` (a single matching token is
    too weak a clue: on prose its drafts are nearly always wrong, and a round
    that verifies them costs more than a plain step); with ``width`` > 1 the
    most recent distinct continuations become a tree.
    """

    name = "lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, context, hidden, draft_len, width):
        candidates: list[list[int]] = []
        L = len(context)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            tail = context[L - n :]
            for start in range(L - n - 1, -1, -1):  # most recent match first, never the tail itself
                if context[start : start + n] == tail:
                    follow = copy_forward(context, start + n, draft_len)
                    if follow not in candidates:
                        candidates.append(follow)
                        if len(candidates) == width:
                            return candidates
            if candidates:
                return candidates
        return candidates


def copy_forward(context: list[int], source: int, length: int) -> list[int]:
    """The ``length`` tokens that copying from ``source`` onwards would write after ``context``.

    A copy may run into the tokens it writes (as LZ77's does), so a match
    just before the end continues a repeating pattern: [a, b, a, b] copied
    from index 2 gives a, b, a, b, ...
    """
    text = list(context)
    for i in range(length):
        text.append(text[source + i])
    return text[len(context) :]


def rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / rms(x) over the last dimension."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class RecurrentDrafter(nn.Module, Drafter):
    """A ReDrafter-style draft head: a small recurrent network on top of the model.

    The state starts from the token just chosen and takes in each drafted token:
    s_1 = tanh(W e(y_0) + b), s_k+1 = tanh(U s_k + W e(y_k) + b), with e the
    model's own (scaled) token embedding. Token k + 1 is predicted from the
    model's last hidden state h (C,) and the state: x = h + MLP([h, s_k]),
    logits = x @ E_sub^T. E_sub are the rows of the model's tied embedding for a
    subset of frequent tokens (``vocab``, M ids): a full 262,144-row output would
    cost 63 % of a model step per drafted token, 4,096 rows and the network about 2 %.
    Runs in fp32 whatever the model's dtype; ``bind(model)`` gathers E_sub.
    """

    name = "redrafter"
    needs_hidden = True

    def __init__(self, d_model: int, vocab: torch.Tensor):
        super().__init__()
        self.embed_in = nn.Linear(d_model, d_model)  # W, b
        self.recur = nn.Linear(d_model, d_model, bias=False)  # U
        self.mlp = nn.Sequential(
            nn.Linear(2 * d_model, 2 * d_model), nn.SiLU(), nn.Linear(2 * d_model, d_model)
        )
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        self.register_buffer("vocab", vocab.long().clone())  # (M,) token ids the head can propose
        self._embed: Callable | None = None
        self.out_rows: torch.Tensor | None = None  # (M, C) fp32
        self.model_vocab = 0  # the model's vocabulary size (sampled drafts give a distribution over it)

    def bind(self, model: Gemma) -> RecurrentDrafter:
        """Take the token embedding and the output rows from ``model`` (frozen: not parameters)."""
        if model.cfg.d_model != self.embed_in.in_features:
            raise ValueError(
                f"this draft head is for d_model={self.embed_in.in_features}, "
                f"the model has d_model={model.cfg.d_model}"
            )
        self.to(model.device)
        embed = model.tok_embed
        self._embed = lambda ids: embed(ids).float().detach()
        with torch.no_grad():
            self.out_rows = embed(self.vocab.to(model.device)).float() / embed.scale  # E rows, unscaled
        self.model_vocab = model.cfg.vocab_size
        return self

    # -- the network

    def first_state(self, token: torch.Tensor) -> torch.Tensor:
        """(N,) token ids -> the state after taking them in from an empty state (N, C)."""
        return torch.tanh(self.embed_in(rms_normalize(self._embed(token))))

    def next_state(self, state: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """(N, C) state, (N,) token ids -> (N, C)."""
        return torch.tanh(self.recur(state) + self.embed_in(rms_normalize(self._embed(token))))

    def logits(self, hidden: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """hidden (N, C) fp32, state (N, C) -> logits over ``vocab`` (N, M)."""
        x = hidden + self.mlp(torch.cat([rms_normalize(hidden), state], dim=-1))
        return x @ self.out_rows.T

    def unrolled_logits(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing for training: hidden (N, C), tokens (N, K) -> logits (N, K, M).

        tokens[:, 0] is the token the model chose from ``hidden``; step k predicts
        the token after tokens[:, k].
        """
        state = self.first_state(tokens[:, 0])
        out = [self.logits(hidden, state)]
        for k in range(1, tokens.shape[1]):
            state = self.next_state(state, tokens[:, k])
            out.append(self.logits(hidden, state))
        return torch.stack(out, dim=1)

    # -- drafting

    @torch.inference_mode()
    def propose(self, context, hidden, draft_len, width):
        """Beam search: the ``width`` most probable continuations of ``draft_len`` tokens.

        Everything stays on the device until the end: one transfer per round.
        """
        device = self.vocab.device
        h = hidden.float().reshape(1, -1)
        state = self.first_state(torch.tensor([context[-1]], device=device))  # (1, C)
        scores = torch.zeros(1, device=device)  # log-probability of each beam
        picks = torch.zeros(1, 0, dtype=torch.long, device=device)  # (beams, k) indices into vocab
        for k in range(draft_len):
            logp = self.logits(h.expand(state.shape[0], -1), state).log_softmax(-1)  # (b, M)
            M = logp.shape[1]
            top = (scores[:, None] + logp).flatten().topk(min(width, logp.numel()))
            beam, pick = top.indices // M, top.indices % M
            picks = torch.cat([picks[beam], pick[:, None]], dim=1)
            scores = top.values
            if k + 1 < draft_len:
                state = self.next_state(state[beam], self.vocab[pick])
        return self.vocab[picks].tolist()

    @torch.inference_mode()
    def propose_sampled(self, context, hidden, draft_len, sampling, rng):
        device = self.vocab.device
        h = hidden.float().reshape(1, -1)
        state = self.first_state(torch.tensor([context[-1]], device=device))
        draft, dists = [], []
        for _ in range(draft_len):
            probs = (self.logits(h, state) / sampling.temperature).softmax(-1)[0]  # (M,)
            pick = int(torch.multinomial(probs, 1, generator=rng))
            q = torch.zeros(self.model_vocab, device=device)
            q[self.vocab] = probs
            token = int(self.vocab[pick])
            draft.append(token)
            dists.append(q)
            state = self.next_state(state, torch.tensor([token], device=device))
        return draft, torch.stack(dists)

    # -- files

    def save(self, path: str | Path, meta: dict[str, str] | None = None) -> None:
        from safetensors.torch import save_file

        tensors = {
            k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype).contiguous()
            for k, v in self.state_dict().items()
        }
        save_file(tensors, str(path), metadata={"d_model": str(self.embed_in.in_features), **(meta or {})})

    @classmethod
    def from_file(cls, path: str | Path, model: Gemma | None = None) -> RecurrentDrafter:
        """Load a saved head (safetensors; nothing is unpickled); bound to ``model`` if given."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no draft head at {path}: train one with `python -m gemma_lite distill`")
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            d_model = int(f.metadata()["d_model"])
        head = cls(d_model, tensors["vocab"])
        head.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
        return head.bind(model) if model is not None else head

    @classmethod
    def bundled(cls, model: Gemma) -> RecurrentDrafter:
        """The head distilled from Gemma 3 270M that ships with the package."""
        return cls.from_file(BUNDLED_DRAFTER, model)


DRAFTERS = ("lookup", "redrafter")


def drafter_named(name: str, model: Gemma, path: str | Path | None = None) -> Drafter:
    """``"lookup"`` (prompt lookup) or ``"redrafter"`` (the bundled head, or the one saved at ``path``)."""
    if name == "lookup":
        return PromptLookup()
    if name == "redrafter":
        return RecurrentDrafter.from_file(path or BUNDLED_DRAFTER, model)
    raise ValueError(f"unknown drafter '{name}'; choose from {', '.join(DRAFTERS)}")


# ---------------------------------------------------------------- the loop


@dataclass
class RoundStats:
    """What the rounds of one call did, and where their time went."""

    rounds: int = 0
    tokens: int = 0  # tokens the rounds added (accepted drafts + the model's own)
    verified: int = 0  # tree nodes the model ran, padding excluded
    beam_tokens: int = 0  # nodes the same candidates would need as separate sequences
    draft_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0
    accepted: list[int] = field(default_factory=list)  # tokens added per round

    @property
    def mean_accepted(self) -> float:
        """Tokens per round (1.0 = no better than plain decoding)."""
        return self.tokens / self.rounds if self.rounds else float("nan")

    @property
    def other_s(self) -> float:
        """Bookkeeping: building trees, accepting, cache moves, text."""
        return self.total_s - self.draft_s - self.verify_s


@dataclass
class SpeculativeGeneration(Generation):
    stats: RoundStats = field(default_factory=RoundStats)


def verify_forward(model: Gemma, ids, slots, cache: KVCache, tree: TokenTree):
    """The model on a token tree at cache slots ``slots``: logits (T, V) and hidden states (T, C)."""
    logits, hidden = model(ids, slots, cache, check_inputs=False, tree=tree, return_hidden=True)
    return logits[0], hidden[0]


class SpeculativeGenerator(Generator):
    """Draft-and-verify decoding of one prompt at a time, with any ``Drafter``.

    draft_len: tokens per candidate (K); width: candidates per round (beams of
    the recurrent head, distinct matches of prompt lookup), merged into a tree.
    Sampling (temperature > 0) drafts a single candidate. compile=True compiles
    the verification pass for a fixed tree size (1 + width * draft_len, padded).
    """

    def __init__(
        self,
        model: Gemma,
        tokenizer,
        drafter: Drafter,
        *,
        draft_len: int = 4,
        width: int = 1,
        compile: bool = False,
        compile_mode: str | None = None,
    ):
        super().__init__(model, tokenizer, use_cache=True, compile=compile, compile_mode=compile_mode)
        if not isinstance(draft_len, int) or draft_len < 1:
            raise ValueError(f"draft_len must be a positive integer, got {draft_len}")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive integer, got {width}")
        if draft_len >= model.cfg.sliding_window:
            raise ValueError(
                f"draft_len={draft_len} reaches past the {model.cfg.sliding_window}-token "
                "sliding window; use fewer"
            )
        self.drafter, self.draft_len, self.width = drafter, draft_len, width
        if self.device.type == "cpu" and isinstance(model.tok_embed, nn.Embedding):
            # A verification pass multiplies a few rows by the head: 4-8x slower on a column-major
            # head (which ``fast.optimize_for_decode`` may pick for single rows) than on a row-major
            # one, and fastest with the native kernel that reads it once for all rows.
            set_embedding_layout(model, column_major=False)
            native.available()
        self.tree_size = 1 + width * draft_len
        self.cache_slack = self.tree_size  # rejected tokens must not evict keys the window still needs
        self._compiled_verify: Callable | None = None

    def verify_fn(self) -> Callable:
        if not self.compile:
            return verify_forward
        if self._compiled_verify is None:
            self._compiled_verify = torch.compile(
                verify_forward, fullgraph=True, dynamic=False, mode=self.compile_mode
            )
        return self._compiled_verify

    @torch.inference_mode()
    def __call__(
        self,
        prompts,
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str | int] = (),
        stop_at_eos: bool = True,
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> SpeculativeGeneration:
        """Generate like ``Generator.__call__`` (same arguments), one prompt, in speculative rounds."""
        sampling = Sampling(temperature, top_k, top_p, repetition_penalty, seed)
        if repetition_penalty != 1.0:
            raise ValueError(
                "repetition_penalty changes the distribution with every token, which a verification "
                "pass cannot see in advance: use SpeculativeGenerator without it (1.0)"
            )
        ids, _, lengths = self.encode_checked(prompts, max_new_tokens)
        if ids.shape[0] != 1:
            raise ValueError(f"speculative decoding runs one prompt at a time, got {ids.shape[0]}")
        T = ids.shape[1]
        rows = self.row_tracker(1, stop, stop_at_eos, on_text)
        rng = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        out = SpeculativeGeneration(text=[], new_ids=rows.new_ids, prompt_tokens=lengths)
        stats = out.stats
        cache = self.cache_for(1, T + max_new_tokens + self.tree_size)

        t0 = time.perf_counter()
        logits, hidden = self.model(
            ids, torch.arange(T, device=self.device), cache, last_only=True, return_hidden=True
        )
        token = int(next_token(logits[:, -1], sampling, rng)[0])
        out.prefill_s = time.perf_counter() - t0
        context = ids[0].tolist() + [token]
        rows.add([token])
        h = hidden[0, -1]
        start = T  # the slot of the root: the last chosen token, not yet in the cache
        verify = self.verify_fn()
        compiling = self.compiles("verify", cache.max_len)

        t_decode = time.perf_counter()
        while rows.n_running and len(rows.new_ids[0]) < max_new_tokens:
            if should_stop is not None and should_stop():
                break
            t_round = time.perf_counter()
            new, h = self._round(context, h, start, cache, sampling, rng, verify, stats)
            start += len(new)
            stats.rounds += 1
            stats.tokens += len(new)
            stats.accepted.append(len(new))
            for t in new:
                if not rows.n_running or len(rows.new_ids[0]) >= max_new_tokens:
                    break
                rows.add([t])
                out.decode_tokens += 1
            context += new
            out.step_times.append(time.perf_counter() - t_round)
        out.decode_s = stats.total_s = time.perf_counter() - t_decode
        out.text = rows.finish()
        out.compile_s = self._compile_time(out, False, compiling and bool(out.step_times))
        return out

    def _round(self, context, h, start, cache, sampling, rng, verify, stats):
        """One draft-and-verify round -> (the tokens it adds, the hidden state for the next round)."""
        t = time.perf_counter()
        hidden = h if self.drafter.needs_hidden else None
        if sampling.greedy:
            candidates = self.drafter.propose(context, hidden, self.draft_len, self.width)
            q = None
        else:
            draft, q = self.drafter.propose_sampled(context, hidden, self.draft_len, sampling, rng)
            candidates = [draft] if draft else []
        if start + self.tree_size > cache.max_len:  # the last few tokens of the context: no room to draft
            candidates = []
        # compiled: one tree size (padded), and one token when there is nothing to verify
        fixed = self.tree_size if self.compile and candidates else None
        tree = build_tree(context[-1], candidates, fixed)
        stats.draft_s += time.perf_counter() - t

        t = time.perf_counter()
        ids = torch.tensor([tree.tokens], device=self.device)
        slots = torch.arange(start, start + tree.size, device=self.device)
        logits, hidden_states = verify(self.model, ids, slots, cache, tree.token_tree(self.device))
        real = tree.size - tree.padding
        if sampling.greedy:
            choices = logits[:real].float().argmax(-1).tolist()  # the round's one device sync
            path = accept_greedy(tree, choices)
            new = tree.path_tokens(path[1:]) + [choices[path[-1]]]
        else:
            drafted = tree.tokens[1:real]
            new = accept_sampled(drafted, model_probs(logits[:real], sampling), q, rng)
            path = list(range(len(new)))
        stats.verify_s += time.perf_counter() - t
        stats.verified += real
        stats.beam_tokens += 1 + sum(len(c) for c in candidates)
        cache.keep(start, path)
        return new, hidden_states[path[-1]]
