"""Turning logits into text: sampling rules and the decode loop.

    gen = Generator(model, tokenizer)                 # eager, with a KV cache
    gen("The capital of France is", max_new_tokens=20).text
    gen(["Hi", "Once upon a time"], temperature=0.8, top_p=0.9, seed=0)   # a batch

Two phases: *prefill* runs the whole prompt once and fills the cache; each
*decode step* then runs a single new token. With ``compile=True`` the decode
step is compiled once (fixed shapes: one token, a tensor position, a static
cache) and reused for every step and every later call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .kv_cache import KVCache
from .measure import sync
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


@dataclass
class Generation:
    """What a call produced: text and ids per prompt, and how long each phase took."""

    text: list[str]
    new_ids: list[list[int]]
    prompt_tokens: list[int]
    prefill_s: float = 0.0
    decode_s: float = 0.0
    compile_s: float = 0.0
    step_times: list[float] = field(default_factory=list)

    @property
    def new_tokens(self) -> int:
        return sum(len(ids) for ids in self.new_ids)

    @property
    def decode_tok_s(self) -> float:
        """Generated tokens per second after the first one (which prefill produced)."""
        steps = len(self.step_times)
        return steps * len(self.text) / self.decode_s if self.decode_s > 0 else float("nan")


def decode_one(
    model: Gemma,
    token: torch.Tensor,
    input_pos: torch.Tensor,
    cache: KVCache,
    valid_from: torch.Tensor | None,
) -> torch.Tensor:
    """One decode step: token (B, 1) at position input_pos (1,) -> logits (B, V)."""
    return model(token, input_pos, cache, valid_from)[:, -1]


class Generator:
    """Generates text from a model, with or without a KV cache, eager or compiled.

    use_cache=False recomputes the whole sequence at every step (the "regular"
    mode of chapter 9); compile=True compiles the step function.
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
        self.device = model.device
        if compile_mode is None and self.device.type == "cuda" and use_cache:
            compile_mode = "reduce-overhead"  # CUDA graphs: one launch per decode step
        self.compile_mode = compile_mode
        self._cache: KVCache | None = None
        self._compiled_step: Callable | None = None
        self._compiled_forward: Callable | None = None

    # -- pieces the benchmark and the chapters reuse

    def cache_for(self, batch: int, length: int) -> KVCache:
        """A reusable cache of at least ``length`` positions.

        Sizes are powers of two (256 at least): each new size is a new shape for
        the compiled step, and powers of two keep that to 8 sizes up to 32k.
        """
        max_len = min(self.model.cfg.max_seq_len, max(256, 1 << (length - 1).bit_length()))
        cache = self._cache
        if cache is None or cache.max_len != max_len or cache.layers[0].k.shape[0] != batch:
            self._cache = cache = self.model.new_cache(batch, max_len)
        cache.reset()
        return cache

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
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
        ids, valid_from, lengths = self.encode_batch(prompts)
        B, T = ids.shape
        context = self.model.cfg.max_seq_len
        if T + max_new_tokens > context:
            raise ValueError(
                f"the prompt ({T} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"context of {context} tokens; shorten the prompt or ask for at most {context - T} new tokens"
            )
        stop_ids = {s for s in stop if isinstance(s, int)} | (
            {self.tokenizer.eos_id} if stop_at_eos else set()
        )
        stop_texts = [s for s in stop if isinstance(s, str)]
        rng = None
        if seed is not None:
            rng = torch.Generator(device=self.device).manual_seed(seed)
        seen = [ids[b, T - n :] for b, n in enumerate(lengths)] if repetition_penalty != 1.0 else None

        out = Generation(text=[""] * B, new_ids=[[] for _ in range(B)], prompt_tokens=lengths)
        done = [False] * B
        streamed = ""
        watch_text = on_text is not None or bool(stop_texts)  # else decode once at the end

        # prefill: the whole prompt at once
        t0 = time.perf_counter()
        if self.use_cache:
            cache = self.cache_for(B, T + max_new_tokens)
            logits = self.model(ids, torch.arange(T, device=self.device), cache, valid_from, last_only=True)[
                :, -1
            ]
        else:
            logits = self.forward_fn()(ids, valid_from=valid_from, last_only=True)[:, -1]
        token = next_token(logits, sampling, rng, seen)
        sync(self.device)
        out.prefill_s = time.perf_counter() - t0

        step = self.step_fn()
        seq = ids
        t_decode = time.perf_counter()
        for i in range(max_new_tokens):
            for b in range(B):
                if done[b]:
                    continue
                tok = int(token[b])
                if tok in stop_ids:
                    done[b] = True
                    continue
                out.new_ids[b].append(tok)
                if not watch_text:
                    continue
                text = self.tokenizer.decode(out.new_ids[b])
                cut = min((text.find(s) for s in stop_texts if s in text), default=-1)
                if cut >= 0:
                    text, done[b] = text[:cut], True
                out.text[b] = text
                if b == 0 and on_text is not None:
                    stable = text.rstrip("\ufffd")  # hold back a half-decoded UTF-8 character
                    if len(stable) > len(streamed) and stable.startswith(streamed):
                        on_text(stable[len(streamed) :])
                        streamed = stable
            if all(done) or i == max_new_tokens - 1 or (should_stop is not None and should_stop()):
                break
            if seen is not None:
                seen = [torch.cat([s, token[b : b + 1]]) for b, s in enumerate(seen)]
            t_step = time.perf_counter()
            pos = T + i
            if self.use_cache:
                logits = step(
                    self.model, token[:, None], torch.tensor([pos], device=self.device), cache, valid_from
                )
            else:
                seq = torch.cat([seq, token[:, None]], dim=1)
                logits = self.forward_fn()(seq, valid_from=valid_from, last_only=True)[:, -1]
            token = next_token(logits, sampling, rng, seen)
            sync(self.device)
            out.step_times.append(time.perf_counter() - t_step)
        out.decode_s = time.perf_counter() - t_decode
        if not watch_text:
            out.text = [self.tokenizer.decode(new) for new in out.new_ids]
        if on_text is not None and len(out.text[0]) > len(streamed) and out.text[0].startswith(streamed):
            on_text(out.text[0][len(streamed) :])
        return out


def generate(model: Gemma, tokenizer, prompt, max_new_tokens: int = 64, **kwargs) -> str | list[str]:
    """Convenience: text in, text out (a list for a list of prompts)."""
    options = {k: kwargs.pop(k) for k in ("use_cache", "compile") if k in kwargs}
    result = Generator(model, tokenizer, **options)(prompt, max_new_tokens, **kwargs)
    single = isinstance(prompt, str) or (len(prompt) and isinstance(prompt[0], int))
    return result.text[0] if single else result.text
