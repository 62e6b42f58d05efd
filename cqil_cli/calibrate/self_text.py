"""The model's own sampled text as calibration windows, alone or mixed with a text spec.

Tuning a converted model to match the original on text the original itself writes covers
whatever the original is good at, not only the calibration text's domain. `SPEC+self[=SHARE]`
(cqil_cli/inputs/text.py `split_self_share`) asks for SHARE of the windows (default 0.25) to be
sampled here, the rest drawn from SPEC as usual (docs/inputs.md#the-models-own-text).
"""

from __future__ import annotations

import torch

from ..core.errors import CqilError
from ..inputs.text import split_self_share, token_samples_up_to

PROMPT_TOKENS = 4  # each sampled window starts from this many tokens of the text
BATCH_SIZE = 16


def sampled_windows(model, tokenizer, count: int, length: int, seed: int,
                    prompts: torch.Tensor | None = None, temperature: float = 1.0,
                    top_p: float = 0.95, batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """count windows of length tokens the model samples itself: LongTensor [count, length].

    Window i is prompts[i % R] ([R, P] token ids, P < length; None: the BOS token, else EOS)
    followed by length - P tokens sampled with temperature and nucleus top_p (no top-k), the
    end-of-sequence token suppressed so that every window is full. Batches of batch_size rows
    go through model.generate with its KV cache. The same model, prompts, seed and batch size
    give the same windows on one device; the global random state is left as it was.
    """
    if count < 1 or length < 2:
        raise CqilError(f"need at least 1 sampled window of 2 tokens (got {count} × {length})")
    if prompts is None:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
            else tokenizer.eos_token_id
        prompts = torch.tensor([[0 if start is None else start]], dtype=torch.long)
    if prompts.dim() != 2 or not 0 < prompts.shape[1] < length:
        raise CqilError(f"sampling prompts must be [rows, P] with 0 < P < {length} "
                        f"(got {tuple(prompts.shape)})")
    device = next(model.parameters()).device
    rows = prompts[torch.arange(count) % prompts.shape[0]].to(device)  # [count, P]
    new_tokens = length - prompts.shape[1]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for first in range(0, count, batch_size):
            batch = rows[first:first + batch_size]
            sequences = model.generate(
                input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=True,
                temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, pad_token_id=pad)  # [b, length]
            out.append(sequences[:, :length].cpu())
    return torch.cat(out).long()


def calibration_windows(model, tokenizer, spec: str, count: int, length: int, seed: int,
                        min_samples: int = 1) -> torch.Tensor:
    """Up to count windows [n, length] of a text spec, as token_samples_up_to draws them; for
    `TEXT+self[=SHARE]`, round(count × SHARE) of them (at least 1) are sampled by the model
    from 4-token starts of TEXT, the rest drawn from TEXT, in an order shuffled for the seed."""
    text_spec, share = split_self_share(spec)
    if not share:
        return token_samples_up_to(tokenizer, spec, count, length, seed, min_samples)
    own = min(count, max(1, round(count * share)))
    starts = token_samples_up_to(tokenizer, text_spec, own, PROMPT_TOKENS, seed + 1)
    windows = sampled_windows(model, tokenizer, own, length, seed, starts)
    if own < count:
        drawn = token_samples_up_to(tokenizer, text_spec, count - own, length, seed,
                                    max(1, min_samples - own))
        windows = torch.cat([drawn, windows])
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    return windows[order]
