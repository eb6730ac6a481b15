"""Hugging Face checkpoints: the directory layout, read and written, and the hub.

A Hugging Face model directory holds ``config.json``, ``model.safetensors``
(or shards plus ``model.safetensors.index.json``) and ``tokenizer.json``.
``HF_CONFIG_KEYS`` maps our config to ``config.json`` and back, the same
table both ways. A hub repo id such as ``google/gemma-3-270m`` is fetched by
``huggingface_hub`` into such a directory (gated: needs a token and network;
a populated local hub cache also works).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import GemmaConfig
from .devices import dtype_name
from .model import Gemma
from .weights import WeightsError, check_shape, external_name

HUB_REPOS = ("google/gemma-3-270m", "google/gemma-3-270m-it")

# our config field <-> its key in config.json; besides these, layer_types <-> global_every
HF_CONFIG_KEYS = {
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
    "bos_id": "bos_token_id",
    "eos_id": "eos_token_id",
    "pad_id": "pad_token_id",
}
_LAYER_TYPES = {"global": "full_attention", "local": "sliding_attention"}  # our layer kind -> HF's


def config_to_hf(cfg: GemmaConfig) -> dict:
    """The ``config.json`` entries that describe ``cfg`` to transformers (``Gemma3TextConfig``)."""
    hf = {theirs: getattr(cfg, ours) for ours, theirs in HF_CONFIG_KEYS.items()}
    # transformers checks types strictly: an integral 256.0 must be written 256
    if (q := cfg.query_pre_attn_scalar) == int(q):
        hf["query_pre_attn_scalar"] = int(q)
    hf["layer_types"] = [_LAYER_TYPES[kind] for kind in cfg.layer_kinds]
    return {**hf, "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True}


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
    values = {ours: hf[theirs] for ours, theirs in HF_CONFIG_KEYS.items() if hf.get(theirs) is not None}
    if isinstance(values.get("eos_id"), list):  # chat models list <end_of_turn> after <eos>
        values["eos_id"] = values["eos_id"][0]
    rope = hf.get("rope_parameters") or {}  # transformers 5 spells the two bases per layer type
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
                        check_shape(name, param, tuple(tensor.shape), file.name)
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
    hf_config = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        **config_to_hf(model.cfg),
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
            f"could not fetch '{repo_id}' from the Hugging Face hub and it is not in the local cache "
            "(nor is it a local file or directory). "
            "Gemma is gated: accept the licence on huggingface.co, log in with `hf auth login`, "
            "or use source='bundled' (offline)."
        ) from e
    except HfHubHTTPError as e:
        raise WeightsError(
            f"the hub refused '{repo_id}': {e}. Gemma is gated: log in with `hf auth login`."
        ) from e
