"""Tiny random models of every supported family and an offline tokenizer, for every test.

- `offline_tokenizer()` / `save_offline_tokenizer(folder)`: a byte-level tokenizer built with
  the `tokenizers` library (no hub, no download): the 256 bytes plus <pad>, <s>, </s>, so it
  encodes any text, deterministically, in VOCAB_SIZE ids. Tiny models use that vocabulary.
- `tiny_model(kind)`: a random transformers causal LM of one of KINDS (the tiny examples of
  cqil_cli/runtime/family_table_cqil.py), in eval mode, fp32.
- `randomise_bypass(model)`: non-trivial CQIL bypass weights (they start at 1).
- `padded_batch(...)`: a left-padded batch of random ids and its mask.
- `rel(a, b)`: max |a - b| / max |b|, the relative difference every equality test uses.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cqil_cli.runtime.family_table_cqil import EXAMPLES
from cqil_cli.runtime.family_table_cqil import FAMILIES as FAMILY_ROWS
from cqil_cli.runtime.family_table_cqil import tiny_config as table_tiny_config

# --------------------------------------------------------------------------- tokenizer

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2 (Llama's default bos 1 / eos 2)
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # + one id per byte


def offline_tokenizer():
    """A byte-level tokenizer (no merges: one id per UTF-8 byte) as a PreTrainedTokenizerFast
    with bos/eos/pad tokens. Like the default model's, it adds no special tokens on encoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 bytes as printable chars
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *alphabet])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    assert len(tokenizer) == VOCAB_SIZE and tokenizer.eos_token_id == EOS_ID
    return tokenizer


def save_offline_tokenizer(folder: Path) -> Path:
    """Write the offline tokenizer's files (tokenizer.json, tokenizer_config.json) to folder."""
    offline_tokenizer().save_pretrained(folder)
    return Path(folder)


# --------------------------------------------------------------------------- models

# kind: (transformers config class, its settings beyond the vocabulary and special ids), one
# per tiny example of runtime/family_table_cqil.py (each family's odd shapes are described
# there): hidden size 64, MLP width 96 unless overridden.
KINDS = {kind: table_tiny_config(kind) for kind in EXAMPLES}
# One kind per supported family (its first example), in the table's order: the saved folders
# of tests/conftest.py's tiny_folder.
FAMILIES = tuple(next(iter(row.examples)) for row in FAMILY_ROWS.values())
# The Llama family (a plain pre-norm layer, separate projections): test_analyze's direct
# computation, which calls transformers' layers without masks or per-type RoPE.
LLAMA_FAMILY = ("llama-gqa", "mistral-one-kv", "qwen2-bias", "qwen3-qknorm")
# The families beyond the Llama family (tests/test_families.py), one kind each.
OTHER_FAMILIES = tuple(kind for kind in FAMILIES if kind not in LLAMA_FAMILY)


def tiny_config(kind: str, **overrides):
    import transformers

    class_name, settings = table_tiny_config(kind, **{
        "vocab_size": VOCAB_SIZE, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID, **overrides})
    return getattr(transformers, class_name)(**settings)


def tiny_model(kind: str, seed: int = 0, *, stop_at_eos: bool = True, **overrides):
    """A random `kind` model (see KINDS), eval mode, fp32; `overrides` go to its config.

    Norm weights are drawn from [0.5, 1.5] and biases from N(0, 0.2²), not left at the trivial
    1 and 0, so that an implementation that forgets one is caught. stop_at_eos=False: generate()
    always runs to max_new_tokens (no eos id in the config or generation config; pad id 0)."""
    from transformers import AutoModelForCausalLM

    if not stop_at_eos:
        overrides.setdefault("eos_token_id", None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.2)
    model.generation_config.pad_token_id = PAD_ID
    if not stop_at_eos:
        model.generation_config.eos_token_id = None
    return model.eval()


def save_tiny(kind: str, folder: Path, seed: int = 0, tokenizer_dir: Path | None = None) -> Path:
    """Save a tiny model as a Hugging Face folder (safetensors) with the offline tokenizer
    (copied from tokenizer_dir when given, else built)."""
    from transformers import AutoTokenizer

    tiny_model(kind, seed).save_pretrained(folder, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else offline_tokenizer()
    tokenizer.save_pretrained(folder)
    return Path(folder)


# --------------------------------------------------------------------------- helpers


def randomise_bypass(model, seed: int = 1, low: float = 0.5, high: float = 1.5) -> None:
    """Draw every CQIL bypass weight (cqil_gamma, cqil_beta; 1 after conversion) from
    [low, high), then refresh the fused engine's weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            for p in (layer.cqil_gamma, layer.cqil_beta):
                if p is not None:
                    p.copy_(torch.rand(p.shape, generator=g) * (high - low) + low)
    model.cqil_refresh_fused()


def padded_batch(vocab_size: int = VOCAB_SIZE, lengths=(12, 9, 5), seed: int = 0):
    """Left-padded random ids [B, T] and their mask [B, T] (1 = token, 0 = padding)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(1, vocab_size, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative difference of the equality tests (fp32 ~1e-5)."""
    return ((a - b).abs().max() / b.abs().max()).item()
