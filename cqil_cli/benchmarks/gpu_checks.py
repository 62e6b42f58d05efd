"""Correctness of cqil's engines on a device, on tiny random models of every supported family.

    python -m cqil_cli.benchmarks.gpu_checks [--device cuda] [--families A,B] [--json PATH]

For each tiny example of each family of runtime/family_table_cqil.py (the configs
tests/tiny_models.py uses too, cut to 5 layers with untied heads; norms and biases not left at 1
and 0, every family's particularity on) a tiny random transformers model, converted with groups
(runtime/checkpoint.py: build_cqil_model; steps [0], [1, 2], [3, 4], bypass distance 1, random
bypass weights), on the device:
  fused=reference fp32   fused engine vs reference engine logits, a left-padded batch, prefill
                         and 4 cached decode steps; max |diff| / max |reference| <= 1e-5 (TF32
                         off)
  fused=reference bf16   the same in bfloat16, <= max(1e-2, 2 x the reference engine's own
                         bf16 error against its fp32 logits): bf16 rounding alone moves the
                         tiny Gemma models' logits by up to 8 % (measured on a CPU), so a
                         fixed 1e-2 would fail engines that agree as well as bf16 allows
  cached=uncached        greedy 16 tokens of generate() with and without the KV cache (fp32):
                         identical
  fastgen=reference      greedy 16 tokens of runtime/fastgen.py (CUDA graph on CUDA) vs the
                         reference engine's generate() (fp32): identical
and the distributed engine (runtime/distributed_cqil.py) at W = 1 in a single-process group
(NCCL on CUDA where torch has it, gloo on the CPU), for each example checked: logits <= 1e-5 of
the reference engine's (fp32, 16 greedy tokens) and greedy tokens identical to the fused
engine's. W = 1 runs single-layer steps only (a group of P layers needs P to divide W), so
those models are converted with every layer single.
Checks are named by example (e.g. llama-gqa); --families picks families by model_type.
Prints one line per check (name, value, limit, pass/fail) and exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..core.files import write_json_atomic
from ..runtime.family_table_cqil import EXAMPLES, MODEL_TYPES, tiny_config

VOCAB, NEW_TOKENS = 259, 16
GROUPS, BYPASS = [[0], [1, 2], [3, 4]], 1
LIMITS = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def examples(families: list[str] | None = None) -> list[str]:
    """The tiny example kinds of `families` (model_types; default: every family), in table
    order."""
    return [kind for kind, row in EXAMPLES.items() if families is None or row.model_type in families]


@dataclass
class Check:
    name: str
    value: float  # a relative error, or a count of differing tokens
    limit: float  # passes when value <= limit
    unit: str  # "relative error" or "tokens differing"

    @property
    def passed(self) -> bool:
        return self.value <= self.limit  # NaN fails

    def line(self) -> str:
        return (f"{'pass' if self.passed else 'FAIL'}  {self.name:<46} {self.value:.2e} "
                f"(limit {self.limit:g}, {self.unit})")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (in fp32)."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max()).item()


def tiny_hf(kind: str, seed: int = 0, **overrides):
    """A random 5-layer transformers causal LM of the tiny example `kind` (family_table_cqil's
    tiny_config), untied, fp32, eval mode, on the CPU: norm weights in [0.5, 1.5), biases
    N(0, 0.2²), no eos (generation runs to its end)."""
    import transformers

    class_name, settings = tiny_config(kind, **{
        "vocab_size": VOCAB, "num_hidden_layers": 5, "bos_token_id": 1, "eos_token_id": None,
        "pad_token_id": 0, "tie_word_embeddings": False, **overrides})
    config = getattr(transformers, class_name)(**settings)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.2)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    return model.eval()


def converted(kind: str, groups=GROUPS, bypass: int = BYPASS):
    """tiny_hf(kind) converted with `groups` and bypass distance, random bypass weights."""
    from ..runtime.checkpoint import build_cqil_model

    model = build_cqil_model(tiny_hf(kind), groups, bypass)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            for p in (layer.cqil_gamma, layer.cqil_beta):
                if p is not None:
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    model.cqil_refresh_fused()
    return model


def padded_batch(device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random ids [3, 12] and their mask (rows of 12, 9 and 5 tokens)."""
    g = torch.Generator().manual_seed(0)
    lengths, T = (12, 9, 5), 12
    ids = torch.randint(1, VOCAB, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
    return ids.masked_fill(mask == 0, 0).to(device), mask.to(device)


def engine_logits(model, engine: str, device) -> list[torch.Tensor]:
    """Logits of one engine: the prefill of the padded batch at its real positions, then 4
    cached decode steps of fixed random tokens (the same for every engine and dtype)."""
    from transformers import DynamicCache

    model.set_engine(engine)
    ids, mask = padded_batch(device)
    cache = DynamicCache()
    out = [model(ids, attention_mask=mask, past_key_values=cache).logits[mask.bool()]]
    g = torch.Generator().manual_seed(2)
    for _ in range(4):
        nxt = torch.randint(1, VOCAB, (ids.shape[0], 1), generator=g).to(device)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        out.append(model(nxt, attention_mask=mask, past_key_values=cache).logits)
    model.set_engine("fused")
    return out


def worst(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The largest rel() over the steps of two engine_logits."""
    return max(rel(a, b) for a, b in zip(got, want, strict=True))


def greedy(model, ids, mask, **kwargs) -> torch.Tensor:
    """generate()'s greedy NEW_TOKENS new tokens [B, NEW_TOKENS]."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         pad_token_id=0, **kwargs)
    return out[:, ids.shape[1]:]


def family_checks(kind: str, device: torch.device) -> list[Check]:
    from ..runtime.fastgen import FastGenerator

    model = converted(kind).to(device)
    reference32 = engine_logits(model, "reference", device)
    checks = [Check(f"fused=reference {kind} fp32",
                    worst(engine_logits(model, "fused", device), reference32),
                    LIMITS[torch.float32], "relative error")]
    ids, mask = padded_batch(device)
    cached = greedy(model, ids, mask, use_cache=True)
    uncached = greedy(model, ids, mask, use_cache=False)
    checks.append(Check(f"cached=uncached {kind} fp32", int((cached != uncached).sum()), 0,
                        "tokens differing"))
    model.set_engine("reference")
    reference = greedy(model, ids, mask)
    model.set_engine("fused")
    fast = FastGenerator(model, cuda_graph=device.type == "cuda")
    tokens = fast.generate(ids, mask, max_new_tokens=NEW_TOKENS).tokens
    how = "graph" if device.type == "cuda" else "eager"
    checks.append(Check(f"fastgen ({how})=reference {kind} fp32",
                        int((tokens.to(reference.device) != reference).sum()), 0,
                        "tokens differing"))
    model.to(torch.bfloat16)
    model.cqil_refresh_fused()
    reference16 = engine_logits(model, "reference", device)
    rounding = worst(reference16, reference32)  # what bf16 costs the reference engine itself
    checks.append(Check(f"fused=reference {kind} bf16",
                        worst(engine_logits(model, "fused", device), reference16),
                        max(LIMITS[torch.bfloat16], 2 * rounding), "relative error"))
    return checks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_checks(device: torch.device, notes: list[str],
                       families: list[str] | None = None) -> list[Check]:
    """The distributed engine at W = 1 (a single-process group) against the fused engine, for
    each example of `families` (default: every family); why it did not run, if it did not, in
    `notes`."""
    import torch.distributed as dist

    from ..runtime.distributed_cqil import init_distributed

    why = ("torch.distributed is not available" if not dist.is_available()
           else "this torch has no NCCL" if device.type == "cuda" and not dist.is_nccl_available()
           else "a process group already exists in this process" if dist.is_initialized()
           else None)
    if why:
        notes.append(f"distributed engine at W=1 skipped: {why}")
        return []
    backend = "nccl" if device.type == "cuda" else "gloo"
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": str(device.index or 0),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        init_distributed(device.type, timeout_s=60)
        probe = torch.ones(1, device=device)
        dist.all_reduce(probe)  # the backend works (W = 1: the engine itself calls none)
        checks = []
        for kind in examples(families):
            checks += _guarded(f"distributed W=1 {kind}", lambda kind=kind:
                               _distributed_family_checks(kind, device, backend))
        return checks
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _distributed_family_checks(kind: str, device: torch.device, backend: str) -> list[Check]:
    """One example's distributed engine at W = 1 (every layer single): the logits of the last
    position of every forward against the reference engine, the computation it implements
    op for op; the greedy tokens against the fused engine, what one device generates. (The
    fused engine's own fp32 rounding drifts from the reference's over 16 greedy tokens: up to
    1.4e-5 relative on the tiny Gemma 3, measured on a CPU.)"""
    from ..runtime.distributed_cqil import DistributedCqil

    model = converted(kind, groups="none", bypass=0).to(device)
    engine = DistributedCqil.from_model(model, rank=0, world_size=1, device=device)
    ids, mask = padded_batch(device)
    got = engine.generate(ids, mask, NEW_TOKENS, output_logits=True)
    settings = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                    pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    model.set_engine("reference")
    reference = model.generate(ids, **settings)
    model.set_engine("fused")
    tokens = model.generate(ids, **settings).sequences[:, ids.shape[1]:]
    error = worst([step[:, -1] for step in got.logits], list(reference.logits))  # last position
    name = f"distributed W=1 ({backend})"
    return [Check(f"{name}=reference {kind} fp32 logits", error, LIMITS[torch.float32],
                  "relative error"),
            Check(f"{name}=fused {kind} fp32 tokens", int((got.tokens != tokens).sum()), 0,
                  "tokens differing")]


def _guarded(what: str, fn) -> list:
    """fn()'s list, or one failed Check naming the exception (its traceback on stderr), so
    that one example's failure does not hide the others' results on a one-shot run."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - reported as a failed check, never swallowed
        traceback.print_exc(file=sys.stderr)
        return [Check(f"{what}: {type(exc).__name__}: {exc}"[:200], float("nan"), 0, "error")]


def run_checks(device: str = "cpu", families: list[str] | None = None) -> dict:
    """Every check on `device`: {"device", "torch", "transformers", "checks": [...], "notes"}."""
    import transformers

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, transformers {transformers.__version__}",
          flush=True)
    checks, notes = [], []
    start = time.perf_counter()
    with torch.no_grad():
        for kind in examples(families):
            for check in _guarded(kind, lambda kind=kind: family_checks(kind, dev)):
                print(check.line(), flush=True)
                checks.append(check)
        found = _guarded("distributed W=1",
                         lambda: distributed_checks(dev, notes, families))
    for check in found:
        print(check.line(), flush=True)
    checks += found
    for note in notes:
        print(f"note: {note}")
    failed = [c.name for c in checks if not c.passed]
    print(f"{len(checks)} checks, {len(failed)} failed, {time.perf_counter() - start:.1f} s"
          + (": " + ", ".join(failed) if failed else ""))
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "checks": [{**asdict(c), "passed": c.passed} for c in checks],
            "failed": failed, "notes": notes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--families", default=",".join(MODEL_TYPES),
                        help="comma-separated families (model_types) to check (default: all)")
    parser.add_argument("--json", help="also write the checks here")
    args = parser.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(MODEL_TYPES))
    if unknown:
        print(f"error: unknown families {', '.join(unknown)} (known: {', '.join(MODEL_TYPES)})",
              file=sys.stderr)
        return 2
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: torch sees no CUDA device here", file=sys.stderr)
        return 2
    result = run_checks(args.device, families)
    if args.json:
        write_json_atomic(Path(args.json), result)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
