"""Turning logits into text: sampling rules and the decode loop.

    gen = Generator(model, tokenizer)                 # eager, with a KV cache
    gen("The capital of France is", max_new_tokens=20).text
    gen(["Hi", "Once upon a time"], temperature=0.8, top_p=0.9, seed=0)   # a batch

Two phases: *prefill* runs the whole prompt once and fills the cache; each
*decode step* then runs a single new token. With ``compile=True`` the decode
step is compiled for fixed shapes (one token, a tensor position, a static
cache): once for each batch size and cache size, then reused for every step
and every later call of that shape.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .devices import device_of
from .kv_cache import KVCache
from .layers import cached_attention
from .model import Gemma

# ---------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. ``temperature=0`` is greedy (argmax)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 (or None for no limit), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (or None for no limit), got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: list[torch.Tensor], penalty: float) -> torch.Tensor:
    """Make tokens already in the text less likely (CTRL rule, as HF does it).

    A seen token's positive logit is divided by ``penalty``, a negative one
    multiplied by it. logits (B, V); seen[b] the ids of row b so far.
    """
    if penalty == 1.0:
        return logits
    logits = logits.clone()
    for row, ids in enumerate(seen):
        ids = ids.unique()
        scores = logits[row, ids]
        logits[row, ids] = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf every token outside the top-k and outside the top-p nucleus. (B, V)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already hold top_p of the mass
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Probabilities (B, V) to sample the next token from: temperature, then top-k, then top-p."""
    return filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)


def next_token(
    logits: torch.Tensor,
    sampling: Sampling,
    rng: torch.Generator | None = None,
    seen: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Choose one token per row. logits (B, V) -> (B,) token ids."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
    if sampling.greedy:
        return logits.argmax(-1)
    logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=rng).squeeze(-1)


# ---------------------------------------------------------------- the loop


def generate_ids(model, ids: torch.Tensor, max_new_tokens: int, stop_ids=(), choose=None) -> list[int]:
    """The plain loop of chapter 7, no cache: up to max_new_tokens token ids after ids (1, T).

    ``choose`` turns the last logits (1, V) into the next token (1,) (default: greedy);
    a token in ``stop_ids`` ends the text and is not returned.
    """
    new = []
    for _ in range(max_new_tokens):
        logits = model(ids)[:, -1]  # (1, V)
        token = logits.argmax(-1) if choose is None else choose(logits)  # (1,)
        if int(token) in stop_ids:
            break
        new.append(int(token))
        ids = torch.cat([ids, token.view(1, 1).to(ids.device)], dim=1)  # (1, T + 1)
    return new


@dataclass
class Generation:
    """What a call produced: text and ids per prompt, and how long each phase took.

    ``compile_s`` is the part of ``prefill_s`` and ``decode_s`` spent compiling:
    the first call of a compiled function for a new shape compiles it.
    """

    text: list[str]
    new_ids: list[list[int]]
    prompt_tokens: list[int]
    prefill_s: float = 0.0
    decode_s: float = 0.0
    compile_s: float = 0.0
    step_times: list[float] = field(default_factory=list)
    decode_tokens: int = 0  # tokens the decode steps generated for rows still running

    @property
    def new_tokens(self) -> int:
        return sum(len(ids) for ids in self.new_ids)

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second of the decode steps (the first token came from prefill).

        Rows that have stopped (end of text, a stop id or string) no longer count.
        """
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def decode_one(
    model: Gemma,
    token: torch.Tensor,
    input_pos: torch.Tensor,
    cache: KVCache,
    valid_from: torch.Tensor | None,
) -> torch.Tensor:
    """One decode step: token (B, 1) at position input_pos (1,) -> logits (B, V).

    No input checks (they would cost device syncs): the caller validates the
    prompt and the positions once.
    """
    return model(token, input_pos, cache, valid_from, check_inputs=False)[:, -1]


def decode_step(
    model: nn.Module,
    ids: torch.Tensor,  # (B, T) the new tokens
    input_pos: torch.Tensor,  # (T,) their positions
    caches: Sequence[nn.Module],  # one cache per layer: update(k, v, input_pos) -> keys, values, key_pos
    attend: Callable = cached_attention,
) -> torch.Tensor:
    """The new tokens through the model over per-layer caches -> logits of the last position (B, V).

    Module by module, so it runs any model with Gemma's submodules (a learner's
    ``Gemma3`` of exercise 6 as well as ``Gemma``) with any caches that have
    ``update``. A prompt fills the caches (the prefill); one token at a tensor
    position is the decode step that compiles once (exercise 10's capstone).
    """
    x = model.tok_embed(ids)  # (B, T, C)
    rope = {kind: model.rope[kind](input_pos, x.dtype) for kind in ("local", "global")}
    for block, cache in zip(model.blocks, caches, strict=True):
        x = x + block.post_attn_norm(
            attend(block.attn, block.attn_norm(x), rope[block.kind], input_pos, cache)
        )
        x = x + block.post_ffn_norm(block.ffn(block.ffn_norm(x)))
    return F.linear(model.final_norm(x[:, -1]), model.tok_embed.weight)  # tied head, (B, V)


class IncrementalText:
    """Decodes a growing list of token ids a few at a time: linear, not quadratic.

    A piece is released once its tokens decode to whole characters (a UTF-8
    character split over byte tokens shows as "\ufffd" until its last byte
    arrives). The tokens of the previous piece are decoded again as context,
    so that the pieces add up to the decode of all the ids.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # the released pieces
        self._context = 0  # ids[_context:_released] were the last piece
        self._released = 0

    def add(self, token: int) -> str:
        """Append one id; return the text it completes ("" while a character is incomplete)."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self._context : self._released])
        now = self.tokenizer.decode(self.ids[self._context :])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        piece = now[len(before) :]
        self._context, self._released = self._released, len(self.ids)
        self.text += piece
        return piece

    def rest(self) -> str:
        """The text not released yet (an incomplete character decodes as "\ufffd")."""
        before = self.tokenizer.decode(self.ids[self._context : self._released])
        return self.tokenizer.decode(self.ids[self._context :])[len(before) :]


class RowTracker:
    """Per-row bookkeeping of a batch: new ids, which rows still run, stop ids and strings.

    stop_texts end a row and cut its text before them; on_text receives the
    text of row 0 as it grows (streaming). Without either, the text is decoded
    once at the end.
    """

    def __init__(self, tokenizer, batch: int, stop_ids: set[int], stop_texts: list[str], on_text=None):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.stop_ids, self.stop_texts = stop_ids, stop_texts
        self.longest_stop = max((len(s) for s in stop_texts), default=0)
        self.new_ids: list[list[int]] = [[] for _ in range(batch)]
        self.running = [True] * batch
        watch = on_text is not None or bool(stop_texts)
        self.texts = [IncrementalText(tokenizer) for _ in range(batch)] if watch else None
        self._cut: dict[int, str] = {}  # rows cut at a stop string: their final text

    @property
    def n_running(self) -> int:
        return sum(self.running)

    def add(self, tokens: list[int]) -> None:
        """The next token of every row (a stopped row's token is ignored)."""
        for b, token in enumerate(tokens):
            if not self.running[b]:
                continue
            if token in self.stop_ids:
                self.running[b] = False
                continue
            self.new_ids[b].append(token)
            if self.texts is not None:
                self._add_text(b, token)

    def _add_text(self, b: int, token: int) -> None:
        text = self.texts[b]
        searched_up_to = len(text.text)
        piece = text.add(token)
        if not piece:
            return
        tail_from = max(0, searched_up_to - self.longest_stop + 1)  # a stop string may end in the new piece
        tail = text.text[tail_from:]
        cut = min((tail.find(s) for s in self.stop_texts if s in tail), default=-1)
        if cut >= 0:
            self.running[b] = False
            self._cut[b] = text.text[: tail_from + cut]
            piece = piece[: max(0, len(self._cut[b]) - searched_up_to)]
        if b == 0 and self.on_text is not None and piece:
            self.on_text(piece)

    def finish(self) -> list[str]:
        """The text of every row; the rest of row 0's text goes to on_text."""
        if self.texts is None:
            return [self.tokenizer.decode(ids) for ids in self.new_ids]
        texts = []
        for b, text in enumerate(self.texts):
            if b in self._cut:
                texts.append(self._cut[b])
                continue
            rest = text.rest()
            if b == 0 and self.on_text is not None and rest:
                self.on_text(rest)
            texts.append(text.text + rest)
        return texts


class Generator:
    """Generates text from a model, with or without a KV cache, eager or compiled.

    use_cache=False recomputes the whole sequence at every step (the "regular"
    mode of chapter 9); compile=True compiles the step function: once for each
    batch size and cache size (cache sizes are powers of two, so a handful).
    """

    def __init__(
        self,
        model: Gemma,
        tokenizer,
        *,
        use_cache: bool = True,
        compile: bool = False,
        compile_mode: str | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.use_cache, self.compile = use_cache, compile
        self.device = device_of(model)
        if compile_mode is None and self.device.type == "cuda" and use_cache:
            compile_mode = "reduce-overhead"  # CUDA graphs: one launch per decode step
        self.compile_mode = compile_mode
        self._cache: KVCache | None = None
        self.cache_slack = 0  # extra ring slots of the sliding-window layers (speculative rounds roll back)
        self._compiled_step: Callable | None = None
        self._compiled_forward: Callable | None = None
        self._compiled_shapes: set[tuple] = set()  # shapes the compiled functions have run

    # -- pieces the benchmark and the chapters reuse

    def cache_for(self, batch: int, length: int) -> KVCache:
        """A reusable cache of at least ``length`` positions.

        Sizes are powers of two (256 at least): each new size is a new shape for
        the compiled step, and powers of two keep that to 8 sizes up to 32k.
        """
        max_len = self.cache_len(length)
        cache = self._cache
        if cache is None or cache.max_len != max_len or cache.layers[0].k.shape[0] != batch:
            self._cache = cache = self.model.new_cache(batch, max_len, slack=self.cache_slack)
        cache.reset()
        return cache

    def cache_len(self, length: int) -> int:
        """The cache size for ``length`` positions: the next power of two, 256 at least."""
        return min(self.model.cfg.max_seq_len, max(256, 1 << (length - 1).bit_length()))

    def step_fn(self) -> Callable:
        if not self.compile:
            return decode_one
        if self._compiled_step is None:
            self._compiled_step = torch.compile(
                decode_one, fullgraph=True, dynamic=False, mode=self.compile_mode
            )
        return self._compiled_step

    def forward_fn(self) -> Callable:
        if not self.compile:
            return self.model
        if self._compiled_forward is None:  # the sequence grows: compile for dynamic length
            self._compiled_forward = torch.compile(self.model, dynamic=True)
        return self._compiled_forward

    def encode_batch(self, prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]):
        """Prompts -> left-padded ids (B, T), first real position per row (B,), lengths."""
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], int)):
            prompts = [prompts]
        rows = [self.tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError("every prompt needs at least one token")
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        valid_from = torch.tensor([width - len(r) for r in rows], device=self.device)
        return ids, (valid_from if valid_from.any() else None), [len(r) for r in rows]

    def compiles(self, *shape) -> bool:
        """Whether the next call of a compiled function with this shape compiles it (once per shape)."""
        if not self.compile or shape in self._compiled_shapes:
            return False
        self._compiled_shapes.add(shape)
        return True

    # -- the loop

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
    ) -> Generation:
        """Generate up to ``max_new_tokens`` for each prompt.

        stop: strings (the text is cut before them) or token ids that end a row.
        on_text: called with each new piece of text of the first prompt, as it
        is generated (streaming). should_stop: polled every step (a stop button).
        """
        sampling = Sampling(temperature, top_k, top_p, repetition_penalty, seed)
        ids, valid_from, lengths = self.encode_checked(prompts, max_new_tokens)
        B, T = ids.shape
        rows = self.row_tracker(B, stop, stop_at_eos, on_text)
        rng = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        seen = [ids[b, T - n :] for b, n in enumerate(lengths)] if repetition_penalty != 1.0 else None

        def choose(logits: torch.Tensor) -> torch.Tensor:  # (B, V) -> (B,)
            token = next_token(logits, sampling, rng, seen)
            if seen is not None:
                seen[:] = [torch.cat([s, token[b : b + 1]]) for b, s in enumerate(seen)]
            return token

        out = Generation(text=[], new_ids=rows.new_ids, prompt_tokens=lengths)
        cache = self.cache_for(B, T + max_new_tokens) if self.use_cache else None
        t0 = time.perf_counter()
        prefill_compiled = cache is None and self.compiles("forward", B)
        token = choose(self.last_logits(ids, valid_from, cache))  # (B,)
        new = token.tolist()  # the one device sync of each step
        out.prefill_s = time.perf_counter() - t0
        rows.add(new)

        steps = self.decode_steps(token, ids, valid_from, cache, choose)
        t_decode = time.perf_counter()
        for _ in range(max_new_tokens - 1):
            if not rows.n_running or (should_stop is not None and should_stop()):
                break
            t_step = time.perf_counter()
            new = next(steps).tolist()
            out.step_times.append(time.perf_counter() - t_step)
            out.decode_tokens += rows.n_running
            rows.add(new)
        out.decode_s = time.perf_counter() - t_decode
        out.text = rows.finish()
        step_compiled = cache is not None and bool(out.step_times) and self.compiles("step", B, cache.max_len)
        out.compile_s = self._compile_time(out, prefill_compiled, step_compiled)
        return out

    def row_tracker(self, batch: int, stop, stop_at_eos: bool, on_text) -> RowTracker:
        """A ``RowTracker`` for ``stop`` (ids and strings), the end-of-text id if ``stop_at_eos``."""
        stop_ids = {s for s in stop if isinstance(s, int)}
        if stop_at_eos:
            stop_ids.add(self.tokenizer.eos_id)
        return RowTracker(self.tokenizer, batch, stop_ids, [s for s in stop if isinstance(s, str)], on_text)

    def encode_checked(self, prompts, max_new_tokens: int):
        """``encode_batch``, after checking that the prompts and new tokens fit the context."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
        ids, valid_from, lengths = self.encode_batch(prompts)
        T, context = ids.shape[1], self.model.cfg.max_seq_len
        if T + max_new_tokens > context:
            raise ValueError(
                f"the prompt ({T} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"context of {context} tokens; shorten the prompt or ask for at most {context - T} new tokens"
            )
        return ids, valid_from, lengths

    def decode_steps(
        self,
        token: torch.Tensor,  # (B,) the token the prefill chose
        ids: torch.Tensor,  # (B, T) the prompts
        valid_from: torch.Tensor | None,
        cache: KVCache | None,
        choose: Callable[[torch.Tensor], torch.Tensor],  # logits (B, V) -> tokens (B,)
    ) -> Iterator[torch.Tensor]:
        """Decode steps, one per ``next()``: each yields the next token of every row (B,).

        With a cache a step runs one token at a tensor position advanced in
        place; without one, it re-runs the whole sequence. No input checks and
        no device sync here: the caller checked the prompts once.
        """
        step = self.step_fn()
        position = torch.tensor([ids.shape[1]], device=self.device)  # (1,)
        seq = ids
        while True:
            if cache is not None:
                logits = step(self.model, token[:, None], position, cache, valid_from)
                position += 1
            else:
                seq = torch.cat([seq, token[:, None]], dim=1)
                logits = self.last_logits(seq, valid_from, None, check_inputs=False)
            token = choose(logits)
            yield token

    def last_logits(
        self,
        ids: torch.Tensor,  # (B, T)
        valid_from: torch.Tensor | None,
        cache: KVCache | None,
        check_inputs: bool = True,
    ) -> torch.Tensor:
        """Run a whole sequence, filling the cache if there is one -> logits of its last position (B, V)."""
        if cache is None:
            model = self.forward_fn()
            return model(ids, valid_from=valid_from, last_only=True, check_inputs=check_inputs)[:, -1]
        positions = torch.arange(ids.shape[1], device=self.device)
        return self.model(ids, positions, cache, valid_from, last_only=True, check_inputs=check_inputs)[:, -1]

    @staticmethod
    def _compile_time(out: Generation, prefill_compiled: bool, first_step_compiled: bool) -> float:
        """The time spent compiling: the excess of each compiling call over a typical step.

        (Without a cache a step re-runs the whole sequence: about as long as the prefill.)
        """
        others = out.step_times[1:] if first_step_compiled else out.step_times
        typical = statistics.median(others) if others else 0.0
        compiling = [out.prefill_s] * prefill_compiled + out.step_times[:1] * first_step_compiled
        return sum(max(0.0, t - typical) for t in compiling)


def generate(model: Gemma, tokenizer, prompt, max_new_tokens: int = 64, **kwargs) -> str | list[str]:
    """Convenience: text in, text out (a list for a list of prompts)."""
    options = {k: kwargs.pop(k) for k in ("use_cache", "compile") if k in kwargs}
    result = Generator(model, tokenizer, **options)(prompt, max_new_tokens, **kwargs)
    single = isinstance(prompt, str) or (len(prompt) and isinstance(prompt[0], int))
    return result.text[0] if single else result.text


@dataclass
class LayerCaches:
    """The per-layer caches of a ``StepGenerator``'s generation, and their size."""

    layers: list[nn.Module]
    max_len: int


class StepGenerator(Generator):
    """``Generator`` around a decode step written as a function, with caches made by a function.

    ``step(model, ids (B, T), input_pos (T,), caches) -> logits (B, V)`` has the
    signature of ``decode_step``: it runs the prompt eagerly (the prefill) and,
    with ``compile=True``, each one-token step compiled for fixed shapes
    (``fullgraph=True``, ``dynamic=False``: once per batch and cache size).
    ``new_caches(batch, max_len)`` gives one cache per layer, fresh for every
    generation. The sampling, stopping, streaming and timing are ``Generator``'s,
    so the benchmark times it like its own modes. Prompts of one length only
    (no left padding).
    """

    def __init__(
        self, model: nn.Module, tokenizer, step: Callable, new_caches: Callable, *, compile: bool = True
    ):
        super().__init__(model, tokenizer, compile=compile, compile_mode="default")
        self.step, self.new_caches = step, new_caches

    def cache_for(self, batch: int, length: int) -> LayerCaches:
        max_len = self.cache_len(length)
        return LayerCaches(list(self.new_caches(batch, max_len)), max_len)

    def step_fn(self) -> Callable:
        if self._compiled_step is None:
            step = torch.compile(self.step, fullgraph=True, dynamic=False) if self.compile else self.step
            self._compiled_step = lambda model, token, position, cache, _valid_from: step(
                model, token, position, cache.layers
            )
        return self._compiled_step

    def last_logits(self, ids, valid_from, cache, check_inputs: bool = True) -> torch.Tensor:
        if valid_from is not None:
            raise ValueError("StepGenerator runs prompts of one length: give prompts with equal token counts")
        return self.step(self.model, ids, torch.arange(ids.shape[1], device=self.device), cache.layers)
