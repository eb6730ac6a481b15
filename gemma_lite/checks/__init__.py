"""Checks for the chapters and exercises: your code and the reference, on the same inputs.

    >>> from gemma_lite.checks import check_rmsnorm
    >>> check_rmsnorm(RMSNorm)
    ✅ RMSNorm: matches gemma_lite.layers.RMSNorm on fp32 and bf16 inputs

Every check runs the learner's code and the package's reference on the same
seeded inputs, prints one line and returns a ``CheckResult`` (true when it
passed, so tests can ``assert check_...(fn)``). A failure names the first
mismatch (shape, dtype, or the element with expected and actual values) and,
when the output matches a known mistake, its likely cause. Code that still
raises ``NotImplementedError`` gets a "not done yet" line instead of a traceback.

Checks use ``GemmaConfig.tiny()`` and small random tensors, so they take
milliseconds; only ``check_model`` on a loaded model touches the real weights.
Learner modules get the reference's (random) weights copied in by parameter
name, so they must use the same names as ``gemma_lite.layers``.

``core`` holds the machinery; each chapter's checks live in their own module
(``ch00_setup`` ... ``ch13_export``), and this package exports them all. A new
chapter adds a module and lists its checks below.
"""

from .ch00_setup import check_bf16_round, check_pick_device, check_weight_bytes
from .ch01_tokenizer import check_bpe_encode, check_byte_fallback_chars, check_pieces_to_text
from .ch02_embeddings import check_cosine_neighbours, check_embed_by_onehot, check_embedding, check_rmsnorm
from .ch03_rope import (
    check_apply_rope,
    check_rope,
    check_rope_complex,
    check_rope_matrix,
    check_rotary_embedding,
    check_wavelengths,
)
from .ch04_attention import (
    check_attention,
    check_causal_mask,
    check_grouped_attention,
    check_kv_cache_bytes,
    check_sliding_window_mask,
    check_window_mask,
)
from .ch05_block import check_block, check_block_macs, check_block_parameters, check_geglu, check_gelu_tanh
from .ch06_model import check_gguf_name, check_logit_lens, check_model, check_my_gemma, check_parameter_count
from .ch07_generation import (
    check_generate,
    check_min_p,
    check_repetition_penalty,
    check_sampling,
    check_sequence_logprob,
)
from .ch08_memory import check_max_context, check_training_state_bytes
from .ch09_kv_cache import (
    check_cached_attention,
    check_greedy_with_cache,
    check_my_cache,
    check_ring_cache,
    check_ring_contents,
    check_static_cache,
    check_tokens_processed,
)
from .ch10_compile import (
    capped_attention,
    check_capped_attention,
    check_decode_step,
    check_my_compiled_gemma,
    check_write_kv,
)
from .ch11_quantization import (
    check_gptq_column_step,
    check_leave_one_out_gain,
    check_pack_int4,
    check_spqr_bits,
)
from .ch12_speculative import check_accept_chain, check_expected_speedup, check_tree_mask
from .ch13_export import check_branch_free, check_explicit_step
from .core import FAIL, PASS, TODO, CheckResult, Mismatch

__all__ = [
    "check_static_cache",
    "check_ring_cache",
    "check_my_cache",
    "check_cached_attention",
    "check_my_gemma",
    "check_gguf_name",
    "check_rotary_embedding",
    "check_apply_rope",
    "FAIL",
    "PASS",
    "TODO",
    "CheckResult",
    "Mismatch",
    "capped_attention",
    "check_accept_chain",
    "check_branch_free",
    "check_explicit_step",
    "check_attention",
    "check_bf16_round",
    "check_block",
    "check_block_macs",
    "check_block_parameters",
    "check_bpe_encode",
    "check_byte_fallback_chars",
    "check_capped_attention",
    "check_causal_mask",
    "check_cosine_neighbours",
    "check_embed_by_onehot",
    "check_embedding",
    "check_expected_speedup",
    "check_gelu_tanh",
    "check_geglu",
    "check_generate",
    "check_gptq_column_step",
    "check_greedy_with_cache",
    "check_grouped_attention",
    "check_kv_cache_bytes",
    "check_leave_one_out_gain",
    "check_logit_lens",
    "check_max_context",
    "check_min_p",
    "check_model",
    "check_pack_int4",
    "check_parameter_count",
    "check_pick_device",
    "check_pieces_to_text",
    "check_repetition_penalty",
    "check_ring_contents",
    "check_rmsnorm",
    "check_rope",
    "check_rope_complex",
    "check_rope_matrix",
    "check_sampling",
    "check_sequence_logprob",
    "check_sliding_window_mask",
    "check_spqr_bits",
    "check_tokens_processed",
    "check_training_state_bytes",
    "check_tree_mask",
    "check_wavelengths",
    "check_weight_bytes",
    "check_window_mask",
    "check_write_kv",
    "check_decode_step",
    "check_my_compiled_gemma",
]
