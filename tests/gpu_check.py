"""Correctness of the runtime on a CUDA device (not collected by pytest; CI has no GPU).

    python tests/gpu_check.py [--device cuda]

Runs the equivalence checks of test_modeling.py / test_fastgen.py on the device, fp32 and bf16:
  singles    our model with no groups vs transformers, prefill + 4 cached decode steps
  fused      fused engine vs reference engine, groups of sizes 1..4, bypass 0..3, random
             bypass weights, left-padded batch, prefill + 4 decode steps
  fastgen    greedy tokens of fastgen (CUDA graph, and without) vs generate(), padded batch
  skip       layer skipping: one prompt_length pass vs cached generation; fastgen vs generate()
Tolerances: max |diff| / max |reference| below 1e-5 (fp32; TF32 is off) and 2e-2 (bf16, where
the two sides round differently); greedy tokens must be identical (fp32).
Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_modeling import GROUPINGS, KINDS, tiny_hf  # noqa: E402
from tiny_models import VOCAB_SIZE as V  # noqa: E402
from tiny_models import padded_batch, randomise_bypass, rel  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from cqil_cli.runtime.checkpoint import build_cqil_model  # noqa: E402
from cqil_cli.runtime.fastgen import FastGenerator  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
failures: list[str] = []


def report(name: str, value: float, tol: float) -> None:
    ok = value < tol
    print(f"{'ok  ' if ok else 'FAIL'} {name:<58} {value:.2e} (< {tol:.0e})")
    if not ok:
        failures.append(name)


def check_singles(device, dtype) -> None:
    for kind in KINDS:
        hf = tiny_hf(kind).to(device, dtype)
        model = build_cqil_model(hf, "none", 0)
        ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(3)).to(device)
        for engine in ("fused", "reference"):
            model.set_engine(engine)
            worst = 0.0
            with torch.no_grad():
                hf_cache, our_cache = DynamicCache(config=hf.config), DynamicCache()
                worst = rel(model(ids, past_key_values=our_cache).logits.float(),
                            hf(ids, past_key_values=hf_cache).logits.float())
                for step in range(4):
                    nxt = torch.randint(0, V, (2, 1), generator=torch.Generator().manual_seed(10 + step)).to(device)
                    worst = max(worst, rel(model(nxt, past_key_values=our_cache).logits.float(),
                                           hf(nxt, past_key_values=hf_cache).logits.float()))
            report(f"singles {kind} {engine} {dtype}", worst, TOL[dtype])


def check_fused(device, dtype) -> None:
    cases = [(kind, g, d) for kind in ("mistral-one-kv", "qwen3-qknorm") for g in sorted(GROUPINGS) for d in range(4)]
    cases += [("llama-bias", [[0, 1], [2, 3, 4]], 2), ("qwen2-bias", [[0, 1], [2, 3, 4]], 2)]
    for kind, grouping, distance in cases:
        groups = GROUPINGS[grouping] if isinstance(grouping, str) else grouping
        model = build_cqil_model(tiny_hf(kind), groups, distance)
        randomise_bypass(model, seed=distance)
        model.to(device, dtype)
        ids, mask = (t.to(device) for t in padded_batch())
        real = mask.bool()
        caches, logits = {}, {}
        with torch.no_grad():
            for engine in ("reference", "fused"):
                model.set_engine(engine)
                caches[engine] = DynamicCache()
                logits[engine] = model(ids, attention_mask=mask, past_key_values=caches[engine]).logits.float()
            worst = rel(logits["fused"][real], logits["reference"][real])
            for step in range(4):
                nxt = torch.randint(1, V, (ids.shape[0], 1), generator=torch.Generator().manual_seed(step)).to(device)
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
                for engine in ("reference", "fused"):
                    model.set_engine(engine)
                    logits[engine] = model(nxt, attention_mask=mask, past_key_values=caches[engine]).logits.float()
                worst = max(worst, rel(logits["fused"], logits["reference"]))
        name = grouping if isinstance(grouping, str) else "0-1,2-4"
        report(f"fused=reference {kind} {name} D={distance} {dtype}", worst, TOL[dtype])


def check_fastgen(device) -> None:
    for kind, groups, distance in [("llama-gqa", "none", 0), ("llama-gqa", "1-2,3-4", 1),
                                   ("mistral-one-kv", "0-1,2-4,5-6", 2),
                                   ("qwen3-qknorm", "0-3,4-6", 3)]:
        model = build_cqil_model(tiny_hf(kind), groups, distance)
        randomise_bypass(model)
        model.to(device)
        ids, mask = (t.to(device) for t in padded_batch())
        with torch.no_grad():
            want = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                                  pad_token_id=0)[:, ids.shape[1]:]
        for graph in ((True, False) if device.type == "cuda" else (False,)):
            gen = FastGenerator(model, cuda_graph=graph)
            got = gen.generate(ids, mask, max_new_tokens=16).tokens
            again = gen.generate(ids, mask, max_new_tokens=16).tokens  # graph replayed, not recaptured
            mismatches = int((got != want).sum()) + int((again != want).sum())
            report(f"fastgen {'graph' if graph else 'eager'} {kind} {groups} = generate()", mismatches, 1)


def check_skip(device) -> None:
    model = build_cqil_model(tiny_hf("mistral-one-kv"), [[0], [1, 2], [3], [4], [5], [6]], 1, skip_layers=[3, 5])
    randomise_bypass(model)
    model.to(device)
    ids, mask = (t.to(device) for t in padded_batch())
    p = 8
    with torch.no_grad():
        for engine in ("fused", "reference"):
            model.set_engine(engine)
            cache = DynamicCache()
            steps = [model(ids[:, :p], attention_mask=mask[:, :p], past_key_values=cache).logits]
            for i in range(p, ids.shape[1]):
                steps.append(model(ids[:, i:i + 1], attention_mask=mask[:, :i + 1], past_key_values=cache).logits)
            real = mask.bool()
            one_pass = model(ids, attention_mask=mask, prompt_length=p).logits
            report(f"skip one pass = cached generation {engine}", rel(one_pass[real], torch.cat(steps, 1)[real]), 1e-5)
        model.set_engine("fused")
        want = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                              pad_token_id=0)[:, ids.shape[1]:]
    for graph in ((True, False) if device.type == "cuda" else (False,)):
        got = FastGenerator(model, cuda_graph=graph).generate(ids, mask, max_new_tokens=12).tokens
        report(f"skip fastgen {'graph' if graph else 'eager'} = generate()", int((got != want).sum()), 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else device}, torch {torch.__version__}")
    for dtype in (torch.float32, torch.bfloat16):
        check_singles(device, dtype)
        check_fused(device, dtype)
    check_fastgen(device)
    check_skip(device)
    print(f"\n{len(failures)} failure(s)" + (": " + ", ".join(failures) if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
