"""Every source of weights, and a clear error for everything that can go wrong with them.

Sources: the bundled GGUF, a local Hugging Face directory (one file or
shards, written by us or by transformers), and a hub repo id served from a
huggingface_hub cache laid out in tmp_path with offline mode on: these tests
never touch the network. Tiny-config tests are fast; the real model's are slow.
"""

from __future__ import annotations

import gc
import json
import re
import subprocess
import threading
import warnings

import huggingface_hub.constants
import pytest
import torch
from helpers import (
    PYTHON,
    make_hub_cache,
    max_abs_diff,
    ours_from_hf,
    python_env,
    random_hf_model,
    tiny_tokenizer,
)

import gemma_lite
from gemma_lite import Gemma, GemmaConfig
from gemma_lite.devices import resolve_device
from gemma_lite.huggingface import config_from_hf, save_pretrained
from gemma_lite.weights import WeightsError, empty_model

REPO = "google/gemma-3-270m"
PROMPT = "Gemma belajar bahasa: ภาษาไทย, English, and code() {}"


@pytest.fixture
def offline(monkeypatch):
    """huggingface_hub in offline mode: it reads HF_HUB_OFFLINE once, at import, so patch the constant too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def tiny():
    """A tiny model with random weights (norms included) and a matching transformers model."""
    pytest.importorskip("transformers")
    cfg = GemmaConfig.tiny()
    hf = random_hf_model(cfg, "eager")
    return ours_from_hf(hf, cfg), hf


@pytest.fixture
def tiny_ids():
    generator = torch.Generator().manual_seed(2)
    return torch.randint(0, GemmaConfig.tiny().vocab_size, (1, 40), generator=generator)


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


# ---------------------------------------------------------------- tiny: HF directories and hub cache

@pytest.mark.parametrize("max_shard_bytes", [None, 100_000], ids=["single", "sharded"])
def test_tiny_directory_roundtrip(tiny, tiny_ids, tmp_path, max_shard_bytes):
    model, _ = tiny
    save_pretrained(model, tiny_tokenizer(), tmp_path, max_shard_bytes=max_shard_bytes)
    sharded = (tmp_path / "model.safetensors.index.json").is_file()
    assert sharded == (max_shard_bytes is not None)
    if sharded:
        assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    loaded, _ = gemma_lite.load(tmp_path, device="cpu", progress=False)
    assert loaded.cfg == model.cfg  # global_every=3 and window 8 survive config.json
    assert torch.equal(logits(loaded, tiny_ids), logits(model, tiny_ids))


def test_tiny_transformers_reads_our_directory(tiny, tiny_ids, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, _ = tiny
    save_pretrained(model, tiny_tokenizer(), tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.config.layer_types == ["full_attention" if k == "global" else "sliding_attention"
                                     for k in model.cfg.layer_kinds]
    with torch.no_grad():
        diff = max_abs_diff(hf(tiny_ids).logits, logits(model, tiny_ids))
    assert diff <= 1e-4, diff


def test_tiny_we_read_a_transformers_directory(tiny, tiny_ids, tmp_path):
    """transformers writes rope_parameters, layer_types and a stale "_sliding_window_pattern": 6."""
    model, hf = tiny
    hf.save_pretrained(tmp_path)
    tiny_tokenizer().save(tmp_path / "tokenizer.json")
    loaded, _ = gemma_lite.load(tmp_path, device="cpu", progress=False)
    assert loaded.cfg == model.cfg
    with torch.no_grad():
        diff = max_abs_diff(logits(loaded, tiny_ids), hf(tiny_ids).logits)
    assert diff <= 1e-4, diff


def test_tiny_from_hub_cache(tiny, tiny_ids, tmp_path, offline):
    model, _ = tiny
    save_pretrained(model, tiny_tokenizer(), tmp_path / "files")
    make_hub_cache(tmp_path / "files", tmp_path / "hub", REPO)
    loaded, _ = gemma_lite.load(REPO, device="cpu", cache_dir=tmp_path / "hub", progress=False)
    assert torch.equal(logits(loaded, tiny_ids), logits(model, tiny_ids))


# ---------------------------------------------------------------- real model: HF directories and hub cache

@pytest.mark.slow
def test_real_directory_roundtrip(real, real_hf_dir):
    model, tokenizer = real
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    files = sorted(p.name for p in real_hf_dir.iterdir())
    assert files == ["config.json", "model.safetensors", "tokenizer.json"]
    loaded, loaded_tok = gemma_lite.load(real_hf_dir, device="cpu", dtype=torch.float32, progress=False)
    assert loaded.cfg == model.cfg
    assert loaded_tok.encode(PROMPT) == ids[0].tolist()
    assert torch.equal(logits(loaded, ids), logits(model, ids))


@pytest.mark.slow
def test_real_sharded_directory_roundtrip(real, tmp_path):
    model, tokenizer = real
    save_pretrained(model, tokenizer, tmp_path, max_shard_bytes=200_000_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    assert all((tmp_path / s).is_file() for s in shards)
    loaded, _ = gemma_lite.load(tmp_path, device="cpu", dtype=torch.float32, progress=False)
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    assert torch.equal(logits(loaded, ids), logits(model, ids))


@pytest.mark.slow
def test_real_directory_loads_in_transformers(real, real_hf_dir, record_property):
    transformers = pytest.importorskip("transformers")
    model, tokenizer = real
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(real_hf_dir, dtype=torch.float32).eval()
        hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(real_hf_dir / "tokenizer.json"))
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    assert hf_tok(PROMPT, add_special_tokens=False)["input_ids"] == ids[0, 1:].tolist()
    with torch.no_grad():
        diff = max_abs_diff(hf(ids).logits, model(ids))
    print(f"\n[loading] transformers on our saved directory: max |logit diff| = {diff:.3g}")
    record_property("saved_dir_transformers_max_abs_diff", diff)
    assert diff <= 1e-4
    del hf
    gc.collect()


@pytest.mark.slow
def test_real_from_hub_cache(real, real_hf_dir, tmp_path, offline):
    model, tokenizer = real
    snapshot = make_hub_cache(real_hf_dir, tmp_path / "hub", REPO)
    assert (snapshot / "model.safetensors").is_symlink()
    loaded, _ = gemma_lite.load(REPO, device="cpu", dtype="float32", cache_dir=tmp_path / "hub",
                                progress=False)
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    assert torch.equal(logits(loaded, ids), logits(model, ids))


# ---------------------------------------------------------------- peak memory

_PEAK_RSS = """
import resource, sys
try:  # Linux: the high-water mark of this process image
    status = open("/proc/self/status").read().splitlines()
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
except OSError:  # macOS: ru_maxrss, in bytes there
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(peak)
"""


def _peak_rss_bytes(code: str, env: dict | None = None) -> int:
    """Peak resident memory, in bytes, of a fresh interpreter that runs ``code``.

    On Linux ``ru_maxrss`` of a child started from this (big) pytest process
    also counts the parent's memory at fork time: the kernel carries the
    pre-exec high-water mark over. ``VmHWM`` belongs to the new process image
    alone, and equals ``ru_maxrss`` for a process started from a shell.
    """
    out = subprocess.run([PYTHON, "-c", code + _PEAK_RSS], capture_output=True, text=True,
                         env=env or python_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dtype", "cold", "limit"),
    [("float32", False, 1.5e9), ("float32", True, 1.5e9), ("bfloat16", False, 1.0e9)],
    ids=["fp32", "fp32-cold-tokenizer-cache", "bf16"],
)
def test_peak_memory_of_a_load(dtype, cold, limit, tmp_path, record_property):
    """A process that dequantizes the GGUF into its own weights, interpreter and imports included,
    stays under the limit (decimal GB).

    "cold": no cached tokenizer yet, so it is rebuilt from the GGUF vocabulary.
    """
    env = python_env()
    if cold:
        env["GEMMA_LITE_CACHE"] = str(tmp_path)
    code = (
        "import gemma_lite\nfrom gemma_lite.gguf_file import bundled_gguf_path\n"
        f"gemma_lite.load(bundled_gguf_path(), device='cpu', dtype='{dtype}', progress=False)"
    )
    peak = _peak_rss_bytes(code, env)
    if cold:
        assert list(tmp_path.glob("tokenizer-*.json")), "the tokenizer should have been rebuilt and cached"
    print(f"\n[memory] load in {dtype}{' (cold)' if cold else ''}: peak RSS {peak / 1e9:.3f} GB")
    record_property(f"peak_rss_{dtype}{'_cold' if cold else ''}", peak)
    assert peak < limit, f"peak RSS {peak / 1e9:.3f} GB >= {limit / 1e9} GB"


@pytest.mark.slow
def test_a_shared_load_reads_no_weights_until_they_are_used(record_property):
    """``load("bundled")`` maps the weights directory's copy: the process holds the runtime and the
    tokenizer, and the weights' pages only when a forward pass reads them (shared with other processes)."""
    from gemma_lite.loading import load_shared

    load_shared(torch.float32, progress=False)  # the copy exists (written once per machine)
    code = "import gemma_lite\ngemma_lite.load(device='cpu', dtype='float32', progress=False)"
    peak = _peak_rss_bytes(code)
    record_property("peak_rss_shared_load", peak)
    # runtime ~0.24 GB + parsing tokenizer.json ~0.45 GB at its peak; the fp32 weights alone are 1.07 GB
    assert peak < 0.8e9, f"peak RSS {peak / 1e9:.3f} GB: the weights were read, not mapped"


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("source", ["no-such-model", "./no/such/dir", "~/no-such-dir/gemma", "missing.gguf"])
def test_source_that_does_not_exist(source, tmp_path, monkeypatch):
    """Not a file, not a directory, not a hub repo id: say so, and name the three kinds of source."""
    monkeypatch.chdir(tmp_path)
    message = (rf"source '{re.escape(source)}' does not exist: no such file or directory\. "
               r"A source is 'bundled' .*, a local \.gguf file or Hugging Face model directory, "
               r"or a hub repo id such as 'google/gemma-3-270m'")
    with pytest.raises(WeightsError, match=message):
        gemma_lite.load(source, device="cpu")


def test_a_file_that_is_not_gguf(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"weights")
    message = r"model\.bin is a file but not a \.gguf file\. A source is 'bundled'"
    with pytest.raises(WeightsError, match=message):
        gemma_lite.load(tmp_path / "model.bin", device="cpu")


def test_directory_without_weights(tmp_path):
    save_pretrained(Gemma(GemmaConfig.tiny()), tiny_tokenizer(), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    message = r"no weights in .*expected model\.safetensors or model\.safetensors\.index\.json"
    with pytest.raises(WeightsError, match=message):
        gemma_lite.load(tmp_path, device="cpu", progress=False)


def test_directory_with_a_missing_shard(tmp_path):
    save_pretrained(Gemma(GemmaConfig.tiny()), tiny_tokenizer(), tmp_path, max_shard_bytes=100_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    message = rf"shard\(s\) \['{victim.name}'\] listed in the index are missing"
    with pytest.raises(WeightsError, match=message):
        gemma_lite.load(tmp_path, device="cpu", progress=False)


def test_directory_without_config(tmp_path):
    with pytest.raises(WeightsError, match=r"has no config\.json: not a Hugging Face model directory"):
        gemma_lite.load(tmp_path, device="cpu")


@pytest.mark.parametrize("keep", [0.5, 0.999, 100], ids=["half", "last-bytes", "inside-header"])
def test_truncated_safetensors(tmp_path, keep):
    save_pretrained(Gemma(GemmaConfig.tiny()), tiny_tokenizer(), tmp_path)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    message = r"model\.safetensors could not be read .*truncated or corrupt: download it again"
    with pytest.raises(WeightsError, match=message):
        gemma_lite.load(tmp_path, device="cpu", progress=False)


@pytest.mark.parametrize("keep", ["header", "data"])
def test_truncated_gguf(gguf_path, tmp_path, keep):
    source = gguf_path
    size = source.stat().st_size
    n = 2_000_000 if keep == "header" else size - 4096  # the vocabulary alone is ~4 MB of header
    target = tmp_path / "short.gguf"
    with open(source, "rb") as f:
        target.write_bytes(f.read(n))
    expected = {"header": "ends in the middle of its header: it is truncated",
                "data": "short.gguf is truncated"}[keep]
    with pytest.raises(WeightsError, match=rf"{expected}.*Download or assemble the file again"):
        gemma_lite.load(target, device="cpu", progress=False)


def test_not_a_gguf_file(tmp_path):
    target = tmp_path / "weights.gguf"
    target.write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(WeightsError, match=r"is not a GGUF file \(it does not start with 'GGUF'\)"):
        gemma_lite.load(target, device="cpu")


def test_checksum_mismatch_of_a_gguf_file(gguf_path):
    message = r"checksum mismatch: .*does not have the expected sha256 0{64}.*download it again"
    with pytest.raises(WeightsError, match=message):
        gemma_lite.load(gguf_path, device="cpu", sha256="0" * 64)


def test_damaged_bundled_file(tmp_path, monkeypatch):
    """A bundled file whose bytes changed is refused. The real cache file is never touched."""
    damaged = tmp_path / "gemma-3-270m-q4_k_m.gguf"
    damaged.write_bytes(b"GGUF" + b"\0" * 1000)
    monkeypatch.setenv("GEMMA_LITE_WEIGHTS", str(tmp_path))
    with pytest.raises(WeightsError, match=r"checksum mismatch: .*is damaged.*Delete it and load again"):
        gemma_lite.load(device="cpu")
    assert damaged.exists()  # we say what to do; we do not delete the user's file


def test_config_that_does_not_fit_the_weights(tmp_path):
    save_pretrained(Gemma(GemmaConfig.tiny()), tiny_tokenizer(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hidden_size"] = 32  # the weights have 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"has shape \(512, 64\) but the config expects \(512, 32\)\. "
                                           r"The config does not fit these weights"):
        gemma_lite.load(tmp_path, device="cpu", progress=False)


def test_unsupported_layer_pattern(tmp_path):
    save_pretrained(Gemma(GemmaConfig.tiny()), tiny_tokenizer(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["layer_types"] = ["full_attention", *config["layer_types"][1:]]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"not one full_attention layer every N layers"):
        gemma_lite.load(tmp_path, device="cpu", progress=False)


def test_not_in_hub_cache(tmp_path, offline):
    with pytest.raises(WeightsError, match=r"could not fetch 'google/gemma-3-270m'.*not in the local cache.*"
                                           r"hf auth login.*source='bundled'"):
        gemma_lite.load(REPO, device="cpu", cache_dir=tmp_path / "empty-hub")


def test_token_ids_out_of_range():
    model = Gemma(GemmaConfig.tiny()).eval()
    for bad in (512, -1):
        ids = torch.tensor([[1, 2, bad]])
        with pytest.raises(ValueError, match=rf"token id {bad} is out of range: .*ids 0\.\.511"):
            model(ids)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_unavailable_device():
    with pytest.raises(RuntimeError, match=r"device 'cuda' was requested but is not available .*"
                                           r"available: cpu.*Pass device=None"):
        gemma_lite.load(device="cuda")
    with pytest.raises(RuntimeError, match="not available"):
        resolve_device("mps" if not torch.backends.mps.is_available() else "cuda")


@pytest.mark.parametrize(("dtype", "message"), [
    ("float64", r"unknown dtype 'float64'; use one of \[.*'bfloat16'.*'float32'"),
    ("fp8", r"unknown dtype 'fp8'"),
    (torch.int8, r"dtype must be float32, bfloat16 or float16, got torch\.int8"),
])
def test_bad_dtype(dtype, message):
    with pytest.raises(ValueError, match=message):
        gemma_lite.load(device="cpu", dtype=dtype)


# ---------------------------------------------------------------- building the model


def test_hf_config_round_trip(tmp_path):
    """config.json is written and read through one key table: every field comes back."""
    cfg = GemmaConfig.tiny(bos_id=5, eos_id=6, pad_id=7, rope_local_base=123.0, query_pre_attn_scalar=20.5)
    save_pretrained(Gemma(cfg), None, tmp_path)
    assert config_from_hf(tmp_path) == cfg


def test_empty_model_leaves_the_default_dtype_alone_in_every_thread(monkeypatch):
    """A model built in bf16 in a thread (the dashboard) changes nothing the notebook creates meanwhile."""
    inside, resume = threading.Event(), threading.Event()

    class PausedGemma(Gemma):
        def __init__(self, cfg):
            super().__init__(cfg)
            inside.set()
            resume.wait(30)

    monkeypatch.setattr(gemma_lite.weights, "Gemma", PausedGemma)
    built = []
    thread = threading.Thread(
        target=lambda: built.append(empty_model(GemmaConfig.tiny(), torch.device("cpu"), torch.bfloat16))
    )
    thread.start()
    assert inside.wait(30)
    meanwhile = (torch.get_default_dtype(), torch.ones(1).dtype)  # this thread, while the other builds
    resume.set()
    thread.join()
    assert meanwhile == (torch.float32, torch.float32)
    assert torch.get_default_dtype() == torch.float32
    assert {p.dtype for p in built[0].parameters()} == {torch.bfloat16}

