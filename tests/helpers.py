"""Helpers shared by the test modules: tiny models, the HF config that matches ours, a hub cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from gemma_lite import Gemma, GemmaConfig, GemmaTokenizer
from gemma_lite.gguf_file import sha256_file
from gemma_lite.huggingface import config_to_hf
from gemma_lite.weights import external_name

REPO_ROOT = Path(__file__).resolve().parent.parent
FAKE_COMMIT = "0123456789abcdef" * 2 + "01234567"  # 40 hex digits, like a git commit hash


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


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
