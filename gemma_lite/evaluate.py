"""How much quantization costs: perplexity on held-out text, and agreement with the unquantized model.

* Perplexity: exp of the mean negative log-likelihood of each next token of
  the held-out text (``calibration.HELDOUT_TEXT``), read in windows of
  ``length`` tokens that each start with BOS. Lower is better; the same text
  and windows on every machine.
* Agreement: the share of positions where the model's most likely next token
  is the reference model's (unquantized) most likely one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .calibration import HELDOUT_TEXT, token_windows
from .measure import stored_bytes
from .model import Gemma
from .quantize import bits_per_param


def heldout_windows(tokenizer, length: int = 512, text: str | None = None) -> torch.Tensor:
    """The held-out text (or ``text``) as windows of ``length`` tokens: (N, length)."""
    return token_windows(tokenizer, HELDOUT_TEXT.read_text() if text is None else text, length)


@torch.no_grad()
def next_token_scores(model: Gemma, windows: torch.Tensor, batch: int = 2) -> tuple[float, torch.Tensor]:
    """(perplexity, top-1 predictions (N, T-1)) of ``model`` on token windows (N, T)."""
    nll, count, top1 = 0.0, 0, []
    for i in range(0, len(windows), batch):
        ids = windows[i : i + batch].to(model.device)
        logits = model(ids)[:, :-1].float()  # (B, T-1, V): the prediction of each next token
        targets = ids[:, 1:]
        nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
        top1.append(logits.argmax(-1).cpu())
    return math.exp(nll / count), torch.cat(top1)


def evaluate(model: Gemma, windows: torch.Tensor, reference_top1: torch.Tensor | None = None) -> dict:
    """perplexity, bits_per_param, agreement (with ``reference_top1``, else None) and model_bytes."""
    perplexity, top1 = next_token_scores(model, windows)
    agreement = None if reference_top1 is None else (top1 == reference_top1).float().mean().item()
    return {
        "perplexity": perplexity,
        "bits_per_param": bits_per_param(model),
        "agreement": agreement,
        "model_bytes": stored_bytes(model),
    }
