"""GGUF input (inputs/models.py): tiny Llama, Gemma 2, Gemma 3 (text) and Phi-3 models written
to GGUF files offline (tests/gguf_writer.py), read back through cqil's model loading and through
`cqil convert`, against the safetensors models they were written from."""

from __future__ import annotations

import functools
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_clean_error, run_cqil
from gguf_writer import write_gguf
from tiny_models import offline_tokenizer, padded_batch, rel, tiny_model

from cqil_cli.core.errors import CqilError
from cqil_cli.inputs.models import load_model
from cqil_cli.runtime.checkpoint import build_cqil_model

REL_TOL = 1e-5  # fp32, max |difference| / max |reference|
# kind (tests/tiny_models.py) -> the overrides that make it a model llama.cpp's GGUF can hold
# (tests/gguf_writer.py): Gemma queries scaled by head_dim, Gemma 3's fixed 5 local : 1 global
# layers (7 layers: one global, layer 5). The rest of each kind stays: GQA and tied embeddings
# (Llama, q/k permuted in the file), Gemma 2's small soft-caps and window, Gemma 3's q/k norms,
# one kv head and linear RoPE scaling on the global layer, Phi-3's fused projections, partial
# rotary and window.
GGUF_KINDS = {
    "llama-gqa": {},
    "gemma2-softcap": {"query_pre_attn_scalar": 16},
    "gemma3-local": {"query_pre_attn_scalar": 32, "layer_types": None},
    "phi3-partial": {},
}
GROUPS = ["--groups", "1-2", "--bypass", "1"]
STEPS = [[0], [1, 2], [3], [4]]  # what GROUPS gives a 5-layer model; 7 layers: [5], [6] too


def gguf_model(kind: str):
    return tiny_model(kind, stop_at_eos=False, **GGUF_KINDS[kind])


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    """kind -> the GGUF file of gguf_model(kind), written once."""
    folder = tmp_path_factory.mktemp("gguf")
    return {kind: write_gguf(gguf_model(kind), folder / f"{kind}.gguf") for kind in GGUF_KINDS}


def quick_latency(monkeypatch) -> None:
    """`cqil convert` measures decode latency for its search and manifest (seconds even on a
    tiny model); a test of weights needs only a shorter measurement of the same kind."""
    from cqil_cli.search import latency_model

    monkeypatch.setattr(latency_model, "measure_latency_model", functools.partial(
        latency_model.measure_latency_model, prompt_len=8, new_tokens=2, repeats=1))


def small_text(folder) -> Path:
    """About 2,000 bytes of words: the 4 calibration windows of 256 tokens `cqil convert`
    needs and a few more, so that its perplexities are quick."""
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly box".split()
    rng = random.Random(0)
    path = Path(folder) / "small.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(400)))
    return path


def logits(model, ids, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("kind", sorted(GGUF_KINDS))
def test_gguf_loads_as_the_model_it_was_written_from(kind, gguf_files):
    original = gguf_model(kind)
    loaded = load_model(str(gguf_files[kind]))
    assert loaded.model_type == original.config.model_type
    assert loaded.num_layers == original.config.num_hidden_layers
    ids, mask = padded_batch()  # 12 positions: past every sliding window (6, 8)
    real = mask.bool()  # padding rows are don't-care
    assert rel(logits(loaded.model, ids, mask)[real], logits(original, ids, mask)[real]) < REL_TOL
    text = "To be, or not to be: <s> that is the question."
    assert loaded.tokenizer(text)["input_ids"] == offline_tokenizer()(text)["input_ids"]


@pytest.mark.parametrize("kind", sorted(GGUF_KINDS))
def test_convert_gguf_equals_the_fused_conversion_of_the_original(kind, gguf_files, tmp_path,
                                                                  monkeypatch):
    quick_latency(monkeypatch)
    out, text_file = tmp_path / "out", small_text(tmp_path)
    result = run_cqil("convert", gguf_files[kind], "--out", out, *GROUPS, "--tune-steps", "0",
                      "--calib", text_file, "--eval", text_file, "--eval-ood", "none",
                      "--device", "cpu")
    assert result.code == 0, result.err[-2000:]
    converted = load_model(str(out))
    original = gguf_model(kind)
    steps = STEPS + [[i] for i in range(5, original.config.num_hidden_layers)]
    assert converted.model.config.groups == steps
    want = build_cqil_model(original, steps, 1)  # the fused engine, bypass weights 1
    ids, mask = padded_batch()
    real = mask.bool()
    assert rel(logits(converted.model, ids, mask)[real], logits(want, ids, mask)[real]) < REL_TOL


def test_dropped_rope_tensors_are_a_clear_error(tmp_path):
    """A GGUF with a tensor transformers' reader drops (Llama 3.1's rope_freqs: scaled RoPE
    frequencies) would load as another model: it is refused in one line."""
    path = write_gguf(gguf_model("llama-gqa"), tmp_path / "scaled.gguf",
                      extra_tensors={"rope_freqs.weight": np.ones(8, dtype=np.float32)})
    with pytest.raises(CqilError, match="llama with Llama 3.1-style scaled RoPE"):
        load_model(str(path))
    assert_clean_error(run_cqil("analyze", path), "not supported")
