"""Shared fixtures: the real model (loaded once per session) and the HF reference.

Every test that uses one of them is marked ``slow``: ``bash course quick``
(``-m "not slow"``) runs without the real weights. Tiny models and the
helpers every test module shares live in ``helpers.py``.
"""

from __future__ import annotations

import os
import tempfile
import warnings

import pytest
import torch

import gemma_lite
from gemma_lite.gguf_file import bundled_gguf_path

torch.set_num_threads(max(1, os.cpu_count() or 1))

# The learner's workbook (gemma_lite.workbook) is never touched: every check that passes
# here, and every notebook kernel started from here, saves its pieces in a fresh folder.
os.environ["GEMMA_LITE_WORKBOOK"] = tempfile.mkdtemp(prefix="gemma-lite-workbook-")


REAL_WEIGHTS = {"gguf_path", "real", "tokenizer", "real_hf_dir", "hf_model", "hf_tokenizer"}  # fixtures below


def pytest_collection_modifyitems(items):
    for item in items:
        if REAL_WEIGHTS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def gguf_path():
    return bundled_gguf_path()


@pytest.fixture(scope="session")
def real():
    """(model, tokenizer) from the bundled weights, fp32 on CPU."""
    return gemma_lite.load("bundled", device="cpu", dtype=torch.float32, progress=False)


@pytest.fixture(scope="session")
def tokenizer(gguf_path):
    """Our tokenizer rebuilt from the GGUF vocabulary, without loading the weights."""
    from gemma_lite.gguf_file import GGUFFile
    from gemma_lite.tokenizer import GemmaTokenizer

    return GemmaTokenizer.from_gguf(GGUFFile(gguf_path).metadata)


@pytest.fixture(scope="session")
def real_hf_dir(real, tmp_path_factory):
    """The real model and tokenizer written as a Hugging Face directory (one safetensors file)."""
    from gemma_lite.huggingface import save_pretrained

    return save_pretrained(*real, tmp_path_factory.mktemp("gemma-hf"))


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    """transformers' Gemma3ForCausalLM from the same GGUF: the reference implementation.

    It runs with transformers' default attention ("sdpa"), sliding window included.
    """
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    return model.eval()


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
