"""Helpers shared by the test modules: tiny models and tokenizers, check results, the HF twin, a hub cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from gemma_lite import Gemma, GemmaConfig, GemmaTokenizer, checks
from gemma_lite.gguf_file import sha256_file
from gemma_lite.huggingface import config_to_hf
from gemma_lite.quantize import quantize
from gemma_lite.weights import external_name

REPO_ROOT = Path(__file__).resolve().parent.parent
FAKE_COMMIT = "0123456789abcdef" * 2 + "01234567"  # 40 hex digits, like a git commit hash


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def random_model(cfg: GemmaConfig | None = None, dtype=torch.float32, device="cpu", seed: int = 0) -> Gemma:
    """``cfg`` (default ``GemmaConfig.tiny()``) with every weight N(0, 0.3), norms included.

    Random norms make a wrong ``(1 + w)`` convention show; the fixed seed makes
    the same model in every test module.
    """
    torch.manual_seed(seed)
    model = Gemma(cfg or GemmaConfig.tiny()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.to(device=device, dtype=dtype)


class CharTokenizer:
    """Ids 0-2 are <pad>, <eos>, <bos>; id 3 + k is the k-th printable ASCII character (98 ids)."""

    pad_id, eos_id, bos_id = 0, 1, 2
    vocab_size = 98

    def encode(self, text, add_bos=True):
        return [self.bos_id] * add_bos + [3 + (ord(c) - 32) % 95 for c in text]

    def decode(self, ids):
        return "".join(chr(32 + i - 3) for i in ids if i >= 3)


def tiny_model_for(dtype: torch.dtype = torch.float32, device="cpu") -> tuple[Gemma, CharTokenizer]:
    """(model, tokenizer) for the benchmark and the dashboard: a tiny model that reads ASCII text."""
    return random_model(GemmaConfig.tiny(vocab_size=CharTokenizer.vocab_size), dtype, device), CharTokenizer()


def tiny_bench_model(dtype: torch.dtype = torch.float32, quant: str = "none") -> tuple[Gemma, CharTokenizer]:
    """``tiny_model_for`` as the benchmark asks for it: by dtype and weight format (int4: groups of 16)."""
    model, tokenizer = tiny_model_for(dtype)
    if quant != "none":
        quantize(model, quant, group_size=16)
    return model, tokenizer


def passes(result, capsys) -> None:
    """A check passed and printed its PASS line."""
    out = capsys.readouterr().out
    assert result, out
    assert result.passed and result.done
    assert out.startswith(checks.PASS), out


def fails(result, capsys, *words: str) -> str:
    """A check failed, printed its FAIL line, and named each of ``words``."""
    out = capsys.readouterr().out
    assert not result, out
    assert result.done, out
    assert out.startswith(checks.FAIL), out
    for word in words:
        assert word in out, f"{word!r} not in {out!r}"
    return out


def todo(*args, **kwargs):
    """A learner's function that is still a TODO."""
    raise NotImplementedError


def hf_text_config(cfg: GemmaConfig, attn_implementation: str = "eager"):
    """transformers' ``Gemma3TextConfig`` for ``cfg``: what ``save_pretrained`` writes to config.json."""
    import transformers

    return transformers.Gemma3TextConfig(**config_to_hf(cfg), attn_implementation=attn_implementation)


def random_hf_model(cfg: GemmaConfig, attn_implementation: str = "eager", seed: int = 0):
    """A randomly initialised transformers ``Gemma3ForCausalLM`` shaped like ``cfg``.

    Every parameter, norms included, gets N(0, 0.3) values: transformers
    initialises norm weights to 0, which would hide a wrong ``(1 + w)`` convention.
    """
    import transformers

    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(hf_text_config(cfg, attn_implementation)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def ours_from_hf(hf_model, cfg: GemmaConfig) -> Gemma:
    """Our model with the weights of ``hf_model``, copied through the documented name map."""
    state = hf_model.state_dict()
    model = Gemma(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(state[external_name(name, "hf")])
    return model


def tiny_tokenizer() -> GemmaTokenizer:
    """A four-word tokenizer: enough for a tiny HF-layout directory to be complete."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    return GemmaTokenizer(Tokenizer(WordLevel(vocab, unk_token="<unk>")))


def make_hub_cache(files_from: Path, cache_dir: Path, repo_id: str, commit: str = FAKE_COMMIT):
    """Lay out ``files_from``'s files as huggingface_hub's cache does after a download.

    cache_dir/models--{org}--{name}/
        blobs/<sha256>                        the file contents
        refs/main                             the commit hash (no newline)
        snapshots/<commit>/<file> -> ../../blobs/<sha256>
    """
    assert len(commit) == 40
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in sorted(files_from.iterdir()):
        blob = repo / "blobs" / sha256_file(file)
        os.link(file, blob)  # a hard link: no copy of a 1 GB checkpoint
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def python_env() -> dict[str, str]:
    """Environment for a ``python -m gemma_lite`` / ``python -c`` subprocess that imports this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


PYTHON = sys.executable
