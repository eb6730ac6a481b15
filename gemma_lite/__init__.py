"""gemma_lite: Gemma 3 270M from scratch, small enough to read in an afternoon.

model, tokenizer = gemma_lite.load()            # bundled weights, best device
ids = torch.tensor([tokenizer.encode("Hello")])
logits = model(ids)                             # (1, T, 262144)
"""

from .config import GemmaConfig
from .kv_cache import KVCache
from .loading import load
from .model import Gemma
from .quantize import bits_per_param, quantize, save_quantized
from .tokenizer import GemmaTokenizer

__all__ = [
    "Gemma",
    "GemmaConfig",
    "GemmaTokenizer",
    "KVCache",
    "bits_per_param",
    "load",
    "quantize",
    "save_quantized",
]
__version__ = "0.1.0"
