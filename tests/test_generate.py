"""`cqil generate` (cqil_cli/generate, cqil_cli/cli/generate.py): greedy tokens on one device
against transformers' generate(), on W = 2 local ranks against one device (Llama and Gemma 2),
the JSON document, a world size the model cannot use, and a rank that dies mid-run.

Each --ranks 2 run starts two fresh interpreters (seconds each), so there are few of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error
from tiny_models import randomise_bypass

from cqil_cli.generate.run import FAIL_AFTER_PREFILL_ENV, GENERATE_SCHEMA
from cqil_cli.runtime.family_table_cqil import families_for

PROMPTS = ("it was the best of times", "hope")  # two lengths: a left-padded batch
NEW_TOKENS = 6
REPO = Path(__file__).resolve().parents[1]


def prompt_args():
    return [arg for p in PROMPTS for arg in ("--prompt", p)]


def generate_json(cqil, folder, tmp_path, *extra, name="out.json") -> dict:
    out = tmp_path / name
    result = cqil("-q", "generate", folder, *prompt_args(), "--new-tokens", NEW_TOKENS,
                  "--json", out, *extra)
    assert result.code == 0, result.err
    document = json.loads(out.read_text())
    assert document["texts"] and all(text in result.out for text in document["texts"] if text)
    return document


def reference_tokens(folder: Path) -> list[list[int]]:
    """transformers' greedy generate() on the batch, each row cut after its first eos."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import cqil_cli  # noqa: F401  (registers the converted folders' classes)

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    batch = tokenizer(list(PROMPTS), return_tensors="pt", padding=True)
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    rows = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


def convert_with_pairs(base: Path, out: Path) -> Path:
    """base converted with groups 1-2, 3-4 (bypass 1, random bypass weights), saved to out."""
    from cqil_cli.inputs.models import load_model
    from cqil_cli.runtime.checkpoint import build_cqil_model, save_converted

    loaded = load_model(str(base))
    model = build_cqil_model(loaded.model, "1-2,3-4", 1)
    randomise_bypass(model)
    return save_converted(model, loaded.tokenizer, out)


@pytest.fixture(scope="module")
def converted_folder(tmp_path_factory, llama_folder) -> Path:
    """The tiny Llama converted with groups 1-2, 3-4 (bypass 1, random bypass weights)."""
    return convert_with_pairs(llama_folder, tmp_path_factory.mktemp("conv") / "cqil")


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny Gemma 2 (post-norms, attention and final soft-caps, alternating sliding and
    global layers, tied embeddings) converted with groups 1-2, 3-4."""
    from tiny_models import save_tiny

    plain = save_tiny("gemma2-softcap", tmp_path_factory.mktemp("gemma2"),
                      tokenizer_dir=tokenizer_dir)
    return convert_with_pairs(plain, tmp_path_factory.mktemp("gemma2-conv") / "cqil")


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny GPT-2: no family cqil runs, so it runs on transformers' generate()."""
    from tiny_models import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    folder = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(config).eval().save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------ one device


def test_single_device_equals_transformers_generate(cqil, llama_folder, tmp_path):
    document = generate_json(cqil, llama_folder, tmp_path)
    assert document["engine"] == "cqil" and document["devices"] == 1
    assert document["tokens"] == reference_tokens(llama_folder)


def test_converted_folder_single_device(cqil, converted_folder, tmp_path):
    document = generate_json(cqil, converted_folder, tmp_path)
    assert document["engine"] == "cqil"
    assert document["tokens"] == reference_tokens(converted_folder)


def test_other_model_runs_on_transformers(cqil, gpt2_folder, tmp_path):
    document = generate_json(cqil, gpt2_folder, tmp_path)
    assert document["engine"] == "transformers"
    assert document["tokens"] == reference_tokens(gpt2_folder)


def test_json_document(cqil, llama_folder, tmp_path):
    document = generate_json(cqil, llama_folder, tmp_path)
    assert document["schema"] == GENERATE_SCHEMA.tag == "cqil.generate/1"
    assert document["prompts"] == list(PROMPTS) and document["new_tokens"] == NEW_TOKENS
    assert len(document["tokens"]) == len(document["texts"]) == len(PROMPTS)
    assert all(1 <= len(row) <= NEW_TOKENS for row in document["tokens"])
    timings = document["timings"]
    assert {"prefill_ms", "decode_ms_per_token", "decode_tokens", "total_ms"} <= set(timings)
    assert timings["prefill_ms"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no staging file left


# ------------------------------------------------------------------------------ W ranks


def checkpoint_bytes(folder: Path) -> int:
    """Bytes of every tensor in the folder's *.safetensors files (the whole model)."""
    from safetensors.torch import load_file

    return sum(t.numel() * t.element_size() for path in folder.glob("*.safetensors")
               for t in load_file(path).values())


@pytest.mark.parametrize("which", ["plain", "converted"])
def test_two_ranks_equal_one_device_reading_their_slices(cqil, llama_folder, converted_folder,
                                                         tmp_path, which):
    """Tokens as on one device; each rank read only its slices of the safetensors (the plain
    tiny Llama has tied embeddings: lm_head is read once, as the embedding)."""
    from cqil_cli.runtime.configuration_cqil import CqilConfig
    from cqil_cli.runtime.distributed_cqil import plan_layout, shard_nbytes

    folder = llama_folder if which == "plain" else converted_folder
    single = generate_json(cqil, folder, tmp_path, name="one.json")
    document = generate_json(cqil, folder, tmp_path, "--ranks", "2", "--device", "cpu",
                             name="two.json")
    assert document["devices"] == 2 and document["engine"] == "cqil-distributed"
    assert document["tokens"] == single["tokens"]
    assert document["texts"] == single["texts"]
    assert "ranks" not in single
    whole = checkpoint_bytes(folder)
    if which == "plain":
        from transformers import AutoConfig

        config = CqilConfig.from_base_config(AutoConfig.from_pretrained(folder), None)
    else:
        config = CqilConfig.from_pretrained(folder)
    layout = plan_layout(config, 2)
    assert [r["rank"] for r in document["ranks"]] == [0, 1]
    for r in document["ranks"]:
        assert 0 < r["bytes"] < whole
        assert r["bytes"] == shard_nbytes(config, layout, r["rank"], torch.float32)


def test_ranks_refuse_a_tampered_folder_and_pickled_weights(cqil, converted_folder, llama_folder,
                                                           tmp_path):
    """The ranks read slices themselves, but check the folder as load_model does."""
    from conftest import copy_folder
    from safetensors.torch import load_file

    from cqil_cli.runtime.manifest import Manifest, write_manifest

    tampered = copy_folder(converted_folder, tmp_path / "tampered")
    write_manifest(tampered, Manifest(
        cqil_version="0", strategy="cqil", base_model={"name": "tiny"}, steps=[[0], [1, 2], [3, 4]],
        num_steps=3, num_layers=5, bypass_distance=1, devices=2, placement={}, predicted={},
        quality={}, calibration={}, tuning={}, grouping={}))
    with open(tampered / "model.safetensors", "r+b") as handle:  # tensor data, not the header
        handle.seek(-8, os.SEEK_END)
        handle.write(b"\0" * 8)
    result = cqil("generate", tampered, "--prompt", "hi", "--ranks", "2", "--device", "cpu")
    assert_clean_error(result, "changed or truncated")

    pickled = copy_folder(llama_folder, tmp_path / "pickled")
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    result = cqil("generate", pickled, "--prompt", "hi", "--ranks", "2", "--device", "cpu")
    assert_clean_error(result, "only pickled weights")


@pytest.mark.parametrize("which, fragment", [("plain", "fit this grouping: 1, 2"),
                                             ("converted", "fit this grouping: 2")])
def test_unusable_world_size_is_one_line(cqil, llama_folder, converted_folder, which, fragment):
    folder = llama_folder if which == "plain" else converted_folder
    result = cqil("generate", folder, "--prompt", "hi", "--ranks", "3", "--device", "cpu")
    assert_clean_error(result, "cannot run this model on 3 ranks", fragment)


def test_other_model_cannot_use_ranks(cqil, gpt2_folder):
    result = cqil("generate", gpt2_folder, "--prompt", "hi", "--ranks", "2", "--device", "cpu")
    families = ", ".join(families_for("distributed"))  # the table's rows, in its order
    assert_clean_error(result, f"--ranks: '{gpt2_folder}' is 'gpt2'",
                       f"cqil's distributed engine runs the families {families} and folders "
                       "converted from them")


def test_gemma_on_two_ranks_equals_one_device_reading_their_slices(cqil, gemma_folder, tmp_path):
    """A converted Gemma 2 through --ranks 2 (single layers tensor-parallel, each post-norm
    after its all-reduce; pairs on lanes of one rank) gives the tokens of one device, each
    rank reading only its slices. (Every family on 2 and 4 ranks: tests/test_distributed.py;
    `cqil bench --ranks` shares this loading: inputs/ranks.py.)"""
    from cqil_cli.runtime.configuration_cqil import CqilConfig
    from cqil_cli.runtime.distributed_cqil import plan_layout, shard_nbytes

    folder = gemma_folder
    single = generate_json(cqil, folder, tmp_path, name="one.json")
    two = generate_json(cqil, folder, tmp_path, "--ranks", "2", "--device", "cpu",
                        name="two.json")
    assert two["engine"] == "cqil-distributed" and two["tokens"] == single["tokens"]
    config = CqilConfig.from_pretrained(folder)
    assert config.base_model_type == "gemma2" and config.post_norms
    layout = plan_layout(config, 2)
    assert [r["bytes"] for r in two["ranks"]] == [shard_nbytes(config, layout, r, torch.float32)
                                                  for r in (0, 1)]
    assert all(0 < r["bytes"] < checkpoint_bytes(folder) for r in two["ranks"])


def _processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds marker (what the test's command started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = next(line for line in (entry / "status").read_text().splitlines()
                         if line.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if marker.encode() in environ and "zombie" not in state:
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_a_dead_rank_ends_every_rank(llama_folder):
    marker = f"cqil-generate-test-{uuid.uuid4().hex}"
    env = dict(os.environ, **{FAIL_AFTER_PREFILL_ENV: "1", "CQIL_TEST_MARKER": marker})
    done = subprocess.run(
        [sys.executable, "-m", "cqil_cli", "generate", str(llama_folder), "--prompt", "hello",
         "--new-tokens", "8", "--ranks", "2", "--device", "cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("cqil: error:")]
    assert len(lines) == 1, done.stderr
    assert "rank 1 exited with code 1" in lines[0]
    assert _processes_with(marker) == []



def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_two_machines_simulated_on_localhost_equal_one_device(cqil, converted_folder, tmp_path):
    """Two torchrun launches (--nnodes 2, one rank each, c10d rendezvous on 127.0.0.1), as two
    machines would run them, without --ranks (the world size comes from the launcher),
    generate the same tokens as one process."""
    single = generate_json(cqil, converted_folder, tmp_path, "--device", "cpu", name="one.json")
    marker = f"cqil-generate-test-{uuid.uuid4().hex}"
    env = dict(os.environ, CQIL_TEST_MARKER=marker)
    out = tmp_path / "two.json"  # written by whichever launch hosts rank 0
    port = _free_port()
    launches = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint",
         f"127.0.0.1:{port}", "--rdzv-id", marker, "-m", "cqil_cli", "-q", "generate",
         str(converted_folder), *prompt_args(), "--new-tokens", str(NEW_TOKENS),
         "--device", "cpu", "--json", str(out)],  # no --ranks: W is the launcher's world size
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in (0, 1)]
    try:
        results = [launch.communicate(timeout=180) for launch in launches]
    finally:
        for launch in launches:
            if launch.poll() is None:
                launch.kill()
                launch.wait()
    for launch, (_, err) in zip(launches, results, strict=True):
        assert launch.returncode == 0, err[-2000:]
    two = json.loads(out.read_text())
    assert two["devices"] == 2 and two["tokens"] == single["tokens"]
    assert _processes_with(marker) == []


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_a_machine_that_never_joins_ends_the_other_within_the_join_timeout(converted_folder):
    """One of two torchrun machines starts; with docs/generate.md's `--rdzv-conf
    join_timeout=15` it gives up in bounded time, non-zero, and leaves nothing running."""
    import time

    marker = f"cqil-generate-test-{uuid.uuid4().hex}"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--node-rank", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint",
         f"127.0.0.1:{_free_port()}", "--rdzv-id", marker, "--rdzv-conf", "join_timeout=15",
         "-m", "cqil_cli", "generate", str(converted_folder), "--prompt", "hi", "--ranks", "2",
         "--device", "cpu"],
        cwd=REPO, env=dict(os.environ, CQIL_TEST_MARKER=marker), capture_output=True,
        text=True, timeout=120)
    assert done.returncode != 0
    assert "RendezvousTimeoutError" in done.stderr
    assert time.monotonic() - started < 60
    assert _processes_with(marker) == []


def test_sampling_on_two_ranks_draws_what_one_device_draws(cqil, llama_folder, tmp_path):
    """--do-sample with temperature, top-k, top-p and a seed: the same tokens on one device and
    on 2 ranks (one sampler, next_tokens, in both engines); a different seed draws others."""
    settings = ["--do-sample", "--temperature", "0.9", "--top-k", "50", "--top-p", "0.95",
                "--seed", "3"]
    one = generate_json(cqil, llama_folder, tmp_path, *settings, name="one.json")
    two = generate_json(cqil, llama_folder, tmp_path, *settings, "--ranks", "2", "--device",
                        "cpu", name="two.json")
    assert one["sampling"] == {"do_sample": True, "temperature": 0.9, "top_k": 50, "top_p": 0.95,
                               "seed": 3}
    assert two["tokens"] == one["tokens"] and two["sampling"] == one["sampling"]
    other = generate_json(cqil, llama_folder, tmp_path, *settings[:-1], "4", name="other.json")
    assert other["tokens"] != one["tokens"]
    greedy = generate_json(cqil, llama_folder, tmp_path, name="greedy.json")
    assert "sampling" not in greedy


def test_sampling_settings_need_do_sample(cqil, llama_folder):
    result = cqil("generate", llama_folder, "--prompt", "hi", "--top-p", "0.5")
    assert_clean_error(result, "need --do-sample")
