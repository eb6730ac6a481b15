"""Training the recurrent draft head by distillation: ``python -m gemma_lite distill``.

The head learns to predict what the model itself would say next, from text the
model writes itself (no data set to download):

1. ``write_texts``: the model continues short seeds greedily (the decoding the
   head will serve), in batches; at every step it also hands over its last
   hidden state and its top next-token logits, so no second pass is needed.
   The seeds are a few tokens the model samples after <bos>, and the opening
   words of lines of the course's own calibration text;
2. ``choose_vocab``: the head proposes only the M tokens the model writes and
   predicts most often (its output rows are gathered from the tied embedding);
3. ``train``: the unrolled head is fitted to the model's distributions, K
   steps ahead (KL divergence over those M tokens), with Adam; a tenth of
   the texts is held out to measure what the head learned, not memorised.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

import torch

from .calibration import CALIBRATION_TEXT
from .generate import Generator
from .model import Gemma
from .speculative import RecurrentDrafter


@dataclass
class TeacherData:
    """What the model did while writing N texts of L tokens.

    ``hidden[:, j]`` is the final-norm hidden state that chose ``tokens[:, j]``;
    ``top_ids[:, j]`` / ``top_logits[:, j]`` are the model's k highest logits for
    that token (the rest of its distribution is negligible for training).
    """

    tokens: torch.Tensor  # (N, L)
    hidden: torch.Tensor  # (N, L, C) fp32
    top_ids: torch.Tensor  # (N, L, k)
    top_logits: torch.Tensor  # (N, L, k) fp32

    def split(self, held_out: float = 0.1) -> tuple[TeacherData, TeacherData]:
        """(training, held-out) by whole texts."""
        n = max(1, round(len(self.tokens) * held_out))
        part = lambda s: TeacherData(self.tokens[s], self.hidden[s], self.top_ids[s], self.top_logits[s])
        return part(slice(n, None)), part(slice(0, n))


def seed_prompts(model: Gemma, tokenizer, n: int, seed_tokens: int = 6, seed: int = 0) -> list[list[int]]:
    """n seeds: half sampled by the model after <bos>, half the opening words of calibration lines."""
    gen = Generator(model, tokenizer)
    sampled = n // 2
    seeds = []
    for i in range(0, sampled, 64):
        b = min(64, sampled - i)
        out = gen([[tokenizer.bos_id]] * b, seed_tokens, temperature=1.0, seed=seed + i, stop_at_eos=False)
        seeds += [[tokenizer.bos_id, *ids] for ids in out.new_ids]
    lines = [line.strip() for line in CALIBRATION_TEXT.read_text().splitlines() if len(line.split()) >= 8]
    random.Random(seed).shuffle(lines)
    for line in lines[: n - sampled]:
        seeds.append(tokenizer.encode(" ".join(line.split()[:6])))
    return seeds


@torch.inference_mode()
def write_texts(
    model: Gemma,
    tokenizer,
    seeds: list[list[int]],
    length: int = 96,
    batch: int = 48,
    top: int = 64,
    progress: bool = True,
) -> TeacherData:
    """Greedy continuations of ``seeds`` with the model's hidden states and top logits at every step."""
    from tqdm.auto import tqdm

    gen = Generator(model, tokenizer)
    captured: dict[str, list[torch.Tensor]] = {"hidden": [], "logits": []}
    hooks = [
        model.final_norm.register_forward_hook(
            lambda m, i, out: captured["hidden"].append(out[:, -1].float())
        ),
        model.register_forward_hook(
            lambda m, i, out: captured["logits"].append(out[:, -1].float().topk(top))
        ),
    ]
    tokens, hidden, top_ids, top_logits = [], [], [], []
    try:
        for i in tqdm(range(0, len(seeds), batch), desc="the model writes texts", disable=not progress):
            captured["hidden"].clear()
            captured["logits"].clear()
            out = gen(seeds[i : i + batch], length, stop_at_eos=False)
            tokens.append(torch.tensor(out.new_ids))
            hidden.append(torch.stack(captured["hidden"][:length], dim=1).cpu())  # (b, L, C)
            best = captured["logits"][:length]
            top_ids.append(torch.stack([t.indices for t in best], dim=1).cpu())
            top_logits.append(torch.stack([t.values for t in best], dim=1).cpu())
    finally:
        for hook in hooks:
            hook.remove()
    return TeacherData(torch.cat(tokens), torch.cat(hidden), torch.cat(top_ids), torch.cat(top_logits))


def choose_vocab(data: TeacherData, size: int = 4096) -> torch.Tensor:
    """The ``size`` ids the model writes or ranks in its top 8 most often (fewer if there are fewer). (M,)"""
    counts = Counter(data.tokens.flatten().tolist())
    counts.update(data.top_ids[..., :8].flatten().tolist())
    return torch.tensor(sorted(t for t, _ in counts.most_common(size)))


def subset_targets(data: TeacherData, rows, cols, vocab: torch.Tensor, lookup: torch.Tensor) -> torch.Tensor:
    """The model's logits over ``vocab`` at (rows, cols): its top-k where in vocab, -inf elsewhere."""
    ids, values = data.top_ids[rows, cols], data.top_logits[rows, cols]  # (..., k)
    where = lookup[ids]  # index into vocab, or -1
    out = torch.full((*ids.shape[:-1], len(vocab) + 1), float("-inf"))
    out.scatter_(-1, torch.where(where >= 0, where, len(vocab)), values)  # outside vocab -> a dropped column
    return out[..., :-1]


def distillation_loss(head: RecurrentDrafter, data: TeacherData, rows, cols, draft_len: int, lookup):
    """KL divergence from the model to the unrolled head, K steps from positions (rows, cols).

    Step k starts from the hidden state that chose token j = cols, takes in
    tokens j..j+k-1 and is scored against the model's distribution for token
    j+k (over ``vocab``, renormalised). Returns the mean KL (0 = the head says
    what the model says) and the share of steps whose top token is the model's.
    """
    steps = torch.arange(draft_len)
    hidden = data.hidden[rows, cols]  # (B, C)
    inputs = data.tokens[rows[:, None], cols[:, None] + steps]  # (B, K)
    target = subset_targets(data, rows[:, None], cols[:, None] + steps + 1, head.vocab, lookup)  # (B, K, M)
    logits = head.unrolled_logits(hidden, inputs)  # (B, K, M)
    p = target.softmax(-1)
    log_p = torch.where(p > 0, target.log_softmax(-1), torch.zeros_like(p))
    loss = (p * (log_p - logits.log_softmax(-1))).sum(-1).mean()
    agree = (logits.argmax(-1) == target.argmax(-1)).float().mean()
    return loss, agree


def vocab_lookup(vocab: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(V,) the index of each id in ``vocab``, or -1."""
    lookup = torch.full((vocab_size,), -1, dtype=torch.long)
    lookup[vocab] = torch.arange(len(vocab))
    return lookup


def train(
    head: RecurrentDrafter,
    data: TeacherData,
    steps: int = 1000,
    batch: int = 256,
    draft_len: int = 5,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    progress: bool = True,
    on_step=None,
) -> list[tuple[float, float]]:
    """AdamW with a cosine-decaying rate; returns (KL, agreement) per step. ``on_step(i, loss, agree)``."""
    from tqdm.auto import tqdm

    N, L = data.tokens.shape
    if L <= draft_len + 1:
        raise ValueError(f"texts of {L} tokens are too short for draft_len={draft_len}")
    lookup = vocab_lookup(head.vocab.cpu(), head.model_vocab)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    history = []
    bar = tqdm(range(steps), desc="distilling the draft head", disable=not progress)
    with torch.enable_grad():
        for i in bar:
            rows = torch.randint(0, N, (batch,), generator=g)
            cols = torch.randint(0, L - draft_len, (batch,), generator=g)
            loss, agree = distillation_loss(head, data, rows, cols, draft_len, lookup)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            history.append((float(loss.detach()), float(agree)))
            if i % 10 == 0:
                bar.set_postfix(kl=f"{history[-1][0]:.3f}", agree=f"{history[-1][1]:.0%}")
            if on_step is not None:
                on_step(i, *history[-1])
    return history


@torch.no_grad()
def held_out_agreement(head: RecurrentDrafter, data: TeacherData, draft_len: int = 5) -> list[float]:
    """Per step ahead (1..K): the share of held-out positions where the head's top token is the model's."""
    N, L = data.tokens.shape
    rows, cols = torch.meshgrid(torch.arange(N), torch.arange(L - draft_len), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    steps = torch.arange(draft_len)
    logits = head.unrolled_logits(data.hidden[rows, cols], data.tokens[rows[:, None], cols[:, None] + steps])
    model_next = data.tokens[rows[:, None], cols[:, None] + steps + 1]  # greedy text: the model's argmax
    proposed = head.vocab.cpu()[logits.argmax(-1)]
    return (proposed == model_next).float().mean(0).tolist()


def distill(
    model: Gemma,
    tokenizer,
    n_texts: int = 512,
    length: int = 96,
    vocab_size: int = 4096,
    steps: int = 1500,
    draft_len: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> tuple[RecurrentDrafter, list[tuple[float, float]], list[float]]:
    """All stages: a head bound to ``model``, its training history, its held-out agreement per step."""
    seeds = seed_prompts(model, tokenizer, n_texts, seed=seed)
    data = write_texts(model, tokenizer, seeds, length, progress=progress)
    training, held_out = data.split()
    torch.manual_seed(seed)
    head = RecurrentDrafter(model.cfg.d_model, choose_vocab(training, vocab_size)).bind(model)
    history = train(head, training, steps, draft_len=draft_len, seed=seed, progress=progress)
    return head, history, held_out_agreement(head, held_out, draft_len)
