"""The distributed engine (cqil_cli/runtime/distributed_cqil.py): its layout and shards without
processes, then W local gloo ranks against the single-device engines, for every family of
cqil_cli/runtime/family_table_cqil.py whose row names the distributed engine.

Process start-up costs seconds here, so each world size runs as one job: W processes forked
from a forkserver that has already imported torch and transformers, each running every case of
that W and saving its tokens and logits to a file; meanwhile this process computes the
references. A job ends within JOB_TIMEOUT_S even when a rank fails (the others are killed).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from test_quant import SCHEMES, quantized
from tiny_models import offline_tokenizer, padded_batch, randomise_bypass, rel, tiny_model
from transformers import DynamicCache

from cqil_cli.runtime.checkpoint import build_cqil_model, load_converted, save_converted
from cqil_cli.runtime.configuration_cqil import CqilConfig
from cqil_cli.runtime.distributed_cqil import (
    DistributedCqil,
    fitting_world_sizes,
    init_distributed,
    load_rank,
    load_shard,
    next_tokens,
    plan_layout,
    safetensors_reader,
    sampling_scores,
    shard_from_model,
    shard_nbytes,
)
from cqil_cli.runtime.families_cqil import qkv_row_slices
from cqil_cli.runtime.family_table_cqil import EXAMPLES, FAMILIES, families_for
from cqil_cli.runtime.quant_cqil import QuantLinear, WeightScheme, quantized_linears

REL_TOL = 1e-5  # fp32, max |difference| / max |reference|
NEW_TOKENS = 16
JOB_TIMEOUT_S = 240  # one world size's whole job; a rank still running then is killed
# What the forkserver imports once, so that every rank starts in well under a second.
PRELOAD = ["torch", "torch.distributed", "transformers", "cqil_cli.runtime.checkpoint",
           "cqil_cli.runtime.distributed_cqil"] + [
    f"transformers.models.{row.module}.modeling_{row.module}" for row in FAMILIES.values()]


@dataclass(frozen=True)
class Case:
    """A tiny model (tests/tiny_models.py), converted with `groups` and bypass D, on W ranks.
    groups "none" (and no skip_layers): the original model under tensor parallelism, compared
    with transformers itself; otherwise compared with the fused engine."""

    world: int
    kind: str
    groups: str | tuple = "none"
    bypass: int = 0
    overrides: tuple = ()  # tiny_model config overrides, (name, value) pairs
    skip_layers: tuple = ()
    fail_on_rank: int | None = None  # that rank raises before its first collective
    folder: str | None = None  # the case saved there: its ranks load their shards from it
    vocab_parallel: bool = True  # False: embedding and lm_head replicated on every rank
    quant: str | None = None  # int8 | int4: the folder is quantized; its ranks generate from it

    @property
    def baseline(self) -> bool:
        return self.groups == "none" and not self.skip_layers

    @property
    def name(self) -> str:
        extra = "".join(f"-{k}={v}" for k, v in self.overrides)
        groups = self.groups if isinstance(self.groups, str) else \
            ",".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in self.groups)
        skip = f"-skip{list(self.skip_layers)}" if self.skip_layers else ""
        head = "" if self.vocab_parallel else "-replicated-head"
        quant = f"-{self.quant}" if self.quant else ""
        return f"W{self.world}-{self.kind}{extra}-{groups}-D{self.bypass}{skip}{head}{quant}"


def pairs(n):  # [[0, 1], [2, 3], ...] (+ [n-1] when n is odd)
    return tuple(tuple(range(i, min(i + 2, n))) for i in range(0, n, 2))


KV2, KV4 = (("num_key_value_heads", 2),), (("num_key_value_heads", 4),)
# 6 heads on 3 kv heads (the default model's 9 on 3, in small): 2 ranks split them 2 + 1.
KV3 = (("hidden_size", 48), ("num_attention_heads", 6), ("num_key_value_heads", 3), ("head_dim", 8))
CASES = [
    # W = 2: the original under tensor parallelism (every family; one-kv-head families with 2 kv
    # heads, since 2 ranks cannot split one), and groups of 2 on lanes of one rank, D = 0, 1, 2.
    Case(2, "llama-gqa"),
    Case(2, "llama-gqa", pairs(5), 0),
    Case(2, "llama-gqa", pairs(5), 1),
    Case(2, "llama-gqa", pairs(5), 2),
    Case(2, "llama-gqa", skip_layers=(2, 3)),  # Unified Layer Skipping, tensor-parallel
    Case(2, "llama-bias"),
    Case(2, "llama-bias", ((0,), (1, 2), (3, 4)), 1),
    Case(2, "qwen2-bias"),
    Case(2, "qwen2-bias", ((0, 1), (2,), (3, 4)), 2),
    Case(2, "mistral-one-kv", overrides=KV2),
    Case(2, "mistral-one-kv", pairs(6), 0, (("num_hidden_layers", 6),)),
    Case(2, "mistral-one-kv", pairs(6), 1, (("num_hidden_layers", 6),)),
    Case(2, "qwen3-qknorm", overrides=KV2),
    Case(2, "qwen3-qknorm", pairs(6), 2, (("num_hidden_layers", 6),)),
    # Uneven tensor parallelism: kv heads that W does not divide (3 on 2 ranks, 4 on 3 ranks).
    Case(2, "llama-gqa", overrides=KV3),
    Case(2, "llama-gqa", pairs(5), 1, KV3),
    Case(3, "llama-bias"),
    # The embedding and lm_head replicated instead of vocab-parallel (tied and untied heads).
    Case(2, "llama-gqa", pairs(5), 1, vocab_parallel=False),
    Case(2, "llama-bias", vocab_parallel=False),
    # Gemma 2 (post-norms, soft-caps, scaled embeddings, tied), Gemma 3 (q/k norms, two RoPEs;
    # groups that mix sliding and global layers) and Phi-3 (fused qkv_proj / gate_up_proj,
    # partial RoPE): tensor parallelism, and groups of 2 on lanes of one rank, D = 0 and > 0.
    Case(2, "gemma2-softcap"),
    Case(2, "gemma2-softcap", pairs(5), 0),
    Case(2, "gemma2-softcap", pairs(5), 1),
    Case(2, "gemma3-local", overrides=KV2),
    Case(2, "gemma3-local", pairs(7), 0, KV2),
    Case(2, "gemma3-local", pairs(7), 2, KV2),
    Case(2, "phi3-partial"),
    Case(2, "phi3-partial", pairs(5), 0),
    Case(2, "phi3-partial", pairs(5), 2),
    Case(2, "granite-multipliers"),
    Case(2, "granite-multipliers", pairs(5), 1),
    Case(2, "olmo2-postnorm", overrides=KV2),  # q/k norms over heads split between 2 ranks
    Case(2, "olmo2-postnorm", pairs(5), 2, KV2),
    # W = 4: tensor parallelism over 4, groups of 2 on lanes of 2 ranks, groups of 4 on lanes of
    # one rank, and both sizes in one model.
    Case(4, "llama-bias"),
    Case(4, "llama-bias", pairs(5), 0),
    Case(4, "llama-bias", pairs(5), 1),
    Case(4, "llama-bias", ((0, 1, 2, 3), (4,)), 2),
    Case(4, "llama-gqa", pairs(4), 1, (("num_hidden_layers", 4),)),
    Case(4, "llama-gqa", ((0, 1, 2, 3),), 3, (("num_hidden_layers", 4),)),
    Case(4, "llama-gqa", ((0, 1), (2, 3, 4, 5)), 1, (("num_hidden_layers", 6),)),
    Case(4, "qwen2-bias", overrides=KV4),
    Case(4, "qwen2-bias", pairs(4), 0, (("num_hidden_layers", 4),)),
    Case(4, "mistral-one-kv", overrides=KV4),
    Case(4, "mistral-one-kv", ((0, 1, 2, 3), (4, 5, 6, 7)), 2, (("num_hidden_layers", 8),)),
    Case(4, "qwen3-qknorm", overrides=KV4),
    Case(4, "qwen3-qknorm", ((0, 1, 2, 3), (4, 5, 6, 7)), 1, (("num_hidden_layers", 8),)),
    Case(4, "llama-bias", pairs(5), 1, vocab_parallel=False),
    # The other families on lanes of 2 ranks (Gemma's post-norms after a sum inside the lane),
    # lanes of one rank and single layers over 4.
    Case(4, "gemma2-softcap", pairs(5), 0, KV4),
    Case(4, "gemma2-softcap", pairs(5), 1, KV4),
    Case(4, "gemma3-local", ((0, 1, 2, 3), (4, 5), (6,)), 2, KV4),
    Case(4, "phi3-partial", pairs(5), 1, KV4),
    Case(4, "granite-multipliers", ((0, 1, 2, 3), (4,)), 3, KV4),
    Case(4, "olmo2-postnorm", pairs(5), 1, KV4),  # whole-projection q/k norms inside a lane
]
# Sampling settings every rank uses for a second, sampled generation of each case.
SAMPLING = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, seed=7)
WORLDS = sorted({c.world for c in CASES})


def build(case: Case):
    """(transformers model, converted CqilForCausalLM with random bypass weights), both fp32;
    the same on every rank and here (seeded)."""
    hf = tiny_model(case.kind, stop_at_eos=False, **dict(case.overrides))
    groups = case.groups if isinstance(case.groups, str) else [list(g) for g in case.groups]
    model = build_cqil_model(hf, groups, case.bypass, skip_layers=list(case.skip_layers) or None)
    randomise_bypass(model, seed=case.bypass + 3)
    return hf, model


# --------------------------------------------------------------------------- the ranks


def rank_main(rank: int, world: int, port: int, cases: list[Case], out_dir: str) -> None:
    """One rank: every case's greedy generation with logits, saved to out_dir/rank{rank}.pt."""
    out = Path(out_dir)
    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        init_distributed("cpu", timeout_s=JOB_TIMEOUT_S)
        ids, mask = padded_batch()
        results = {}
        for case in cases:
            if case.fail_on_rank == rank:
                raise RuntimeError(f"planned failure on rank {rank}")
            if case.quant is not None:
                results[case.name] = generate_quantized(case.folder, rank, world, ids, mask)
                continue
            if case.folder is not None:
                results[case.name] = load_and_compare(case, rank, world, ids, mask)
                continue
            engine = DistributedCqil.from_model(build(case)[1], vocab_parallel=case.vocab_parallel)
            gen = engine.generate(ids, mask, NEW_TOKENS, output_logits=True)
            sampled = engine.generate(ids, mask, NEW_TOKENS, **SAMPLING).tokens
            results[case.name] = {"tokens": gen.tokens, "logits": gen.logits, "sampled": sampled}
        torch.save(results, out / f"rank{rank}.pt")
        torch.distributed.destroy_process_group()
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise SystemExit(1) from None


def load_and_compare(case: Case, rank: int, world: int, ids, mask) -> dict:
    """This rank's shard read from the case's safetensors folder (counting the bytes read)
    against its shard of the model in memory: their logits, and whether load_rank agrees."""
    read = safetensors_reader(case.folder)
    sizes = []

    def counted(sl):
        tensor = read(sl)
        sizes.append(tensor.nbytes)
        return tensor

    config = CqilConfig.from_pretrained(case.folder)
    shard = load_shard(config, plan_layout(config, world), rank, counted)
    direct = load_rank(case.folder, rank, world).state_dict()
    same = direct.keys() == shard.state_dict().keys() and all(
        torch.equal(t, direct[k]) for k, t in shard.state_dict().items())
    loaded = DistributedCqil(shard)(ids, mask)
    in_memory = DistributedCqil.from_model(build(case)[1])(ids, mask)
    return {"read_bytes": sum(sizes), "load_rank_same": same, "loaded": loaded,
            "in_memory": in_memory}


def generate_quantized(folder: str, rank: int, world: int, ids, mask) -> dict:
    """Greedy tokens and logits of this rank's shard of a quantized folder (load_rank: its
    slices of the codes and scales), the kernel mode of each of its quantized linears, and the
    prompt's logits with every linear on the reference path (dequantize, F.linear)."""
    engine = DistributedCqil(load_rank(folder, rank, world))
    gen = engine.generate(ids, mask, NEW_TOKENS, output_logits=True)
    modes = {m.kernel().mode for m in quantized_linears(engine.shard)}
    for linear in quantized_linears(engine.shard):
        linear.use_kernel = False
    dequantized = engine(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))
    return {"tokens": gen.tokens, "logits": gen.logits, "modes": modes, "dequantized": dequantized}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """W rank processes running `cases`; results() waits (at most JOB_TIMEOUT_S from start),
    kills whatever is left, and returns each rank's results or raises with the ranks' errors."""

    def __init__(self, world: int, cases: list[Case], out_dir: Path):
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        self.out_dir, self.world = out_dir, world
        port = free_port()
        self.procs = [ctx.Process(target=rank_main, args=(r, world, port, cases, str(out_dir)),
                                  daemon=True) for r in range(world)]
        self.deadline = time.monotonic() + JOB_TIMEOUT_S
        try:
            for p in self.procs:
                p.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """End every rank still running: SIGTERM, then SIGKILL."""
        for p in self.procs:
            if p.pid is not None and p.is_alive():
                p.terminate()
        for p in self.procs:
            if p.pid is not None:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join(5)

    def results(self) -> list[dict]:
        try:
            while time.monotonic() < self.deadline:
                codes = [p.exitcode for p in self.procs]
                if all(c == 0 for c in codes) or any(c not in (None, 0) for c in codes):
                    break  # done, or a rank failed: the others may wait for it forever
                time.sleep(0.05)
        finally:
            self.stop()
        errors = [f.read_text() for f in sorted(self.out_dir.glob("rank*.err"))]
        codes = [p.exitcode for p in self.procs]
        if errors or any(c != 0 for c in codes):
            late = time.monotonic() >= self.deadline
            raise RuntimeError(f"W={self.world}: exit codes {codes}"
                               f"{' (timed out)' if late else ''}\n" + "\n".join(errors))
        return [torch.load(self.out_dir / f"rank{r}.pt") for r in range(self.world)]


def decode(ref, baseline: bool, ids, mask, pick) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """NEW_TOKENS tokens [B, n] of a single-device model and its logits, fed the way
    DistributedCqil.generate feeds them (positions from the mask); pick: logits [B, V] -> [B]."""
    with torch.no_grad():
        cache = DynamicCache(config=ref.config) if baseline else DynamicCache()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
        logits = [ref(ids, attention_mask=mask, position_ids=positions, cache=cache).logits]
        tokens = [pick(logits[-1][:, -1])]
        pos, full_mask = positions[:, -1:], mask
        for _ in range(NEW_TOKENS - 1):
            pos = pos + 1
            full_mask = torch.cat([full_mask, torch.ones_like(pos)], dim=1)
            logits.append(ref(tokens[-1][:, None], attention_mask=full_mask, position_ids=pos,
                              cache=cache).logits)  # [B, 1, V]
            tokens.append(pick(logits[-1][:, -1]))
    return torch.stack(tokens, dim=1), logits


def reference(case: Case, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """The single-device run of a case: transformers for the baseline, else the fused engine
    (CqilForCausalLM in eval mode under no_grad). Greedy tokens with their logits, generate()'s
    tokens, and the tokens next_tokens draws with SAMPLING's settings and seed."""
    hf, model = build(case)
    ref = hf if case.baseline else model
    tokens, logits = decode(ref, case.baseline, ids, mask, lambda x: x.argmax(-1))
    settings = {k: v for k, v in SAMPLING.items() if k != "seed"}
    generator = torch.Generator().manual_seed(SAMPLING["seed"])
    sampled, _ = decode(ref, case.baseline, ids, mask,
                        lambda x: next_tokens(x, generator=generator, **settings))
    with torch.no_grad():
        generated = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    return {"tokens": tokens, "logits": logits, "generate": generated, "sampled": sampled}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """world size -> (every rank's results, the references), all jobs started at once."""
    ids, mask = padded_batch()
    jobs = {}
    try:
        for w in WORLDS:
            cases = [c for c in CASES if c.world == w]
            jobs[w] = Job(w, cases, tmp_path_factory.mktemp(f"world{w}"))
        refs = {c.name: reference(c, ids, mask) for c in CASES}  # while the ranks run
        yield {w: (job.results(), refs) for w, job in jobs.items()}
    finally:
        for job in jobs.values():
            job.stop()


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_no_forkserver_left():
    """Tiny models on a shared CPU that the ranks also use: one thread here is many times
    faster than several. Afterwards, leave no process behind: the forkserver would otherwise
    live until pytest exits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    from multiprocessing import forkserver

    stop = getattr(forkserver._forkserver, "_stop", None)  # private, but there since 3.8
    if stop is not None:
        stop()


def max_errors(case: Case, got: dict, want: dict, mask: torch.Tensor) -> tuple[float, float]:
    """(prefill, worst decode step) relative errors; a baseline's padded positions are
    don't-care (transformers masks them its own way)."""
    real = mask.bool() if case.baseline else torch.ones_like(mask, dtype=torch.bool)
    prefill = rel(got["logits"][0][real], want["logits"][0][real])
    decode = max(rel(g, w) for g, w in zip(got["logits"][1:], want["logits"][1:], strict=True))
    return prefill, decode


# --------------------------------------------------------------------------- tests: W ranks


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_distributed_equals_single_device(runs, case):
    ranks, refs = runs[case.world]
    got, want = ranks[0][case.name], refs[case.name]
    _, mask = padded_batch()
    assert torch.equal(want["tokens"], want["generate"])  # the reference loop is generate()'s
    assert got["tokens"].shape == (mask.shape[0], NEW_TOKENS)
    assert torch.equal(got["tokens"], want["tokens"]), "greedy tokens differ"
    prefill, decode = max_errors(case, got, want, mask)
    assert prefill < REL_TOL and decode < REL_TOL, f"prefill {prefill:.2e}, decode {decode:.2e}"


@pytest.mark.parametrize("world", WORLDS)
def test_sampling_draws_the_tokens_of_one_process(runs, world):
    """temperature, top-k and top-p with one seed: W ranks draw what one process draws (the
    logits agree within REL_TOL, so the same uniform draws pick the same tokens)."""
    ranks, refs = runs[world]
    for name, got in ranks[0].items():
        assert torch.equal(got["sampled"], refs[name]["sampled"]), name
        assert not torch.equal(got["sampled"], got["tokens"]), f"{name}: sampling = greedy?"


@pytest.mark.parametrize("world", WORLDS)
def test_every_rank_computes_the_same_tokens_and_logits(runs, world):
    ranks, _ = runs[world]
    for name, first in ranks[0].items():
        for r, other in enumerate(ranks[1:], start=1):
            assert torch.equal(other[name]["tokens"], first["tokens"]), f"{name}: rank {r}"
            assert torch.equal(other[name]["sampled"], first["sampled"]), f"{name}: rank {r}"
            for a, b in zip(other[name]["logits"], first["logits"], strict=True):
                assert torch.equal(a, b), f"{name}: rank {r} logits"


def test_a_failing_rank_ends_the_job(tmp_path):
    """Rank 1 fails; rank 0 would wait in its first collective: the job still ends, with the
    error, and no rank is left running."""
    job = Job(2, [Case(2, "llama-gqa", fail_on_rank=1)], tmp_path)
    try:
        with pytest.raises(RuntimeError, match="planned failure on rank 1"):
            job.results()
        assert all(not p.is_alive() for p in job.procs)
    finally:
        job.stop()


LOADED = [Case(2, "llama-gqa", pairs(5), 1),  # tied head, groups on lanes of one rank
          Case(2, "llama-bias"),  # untied head, every layer tensor-parallel with its biases
          Case(2, "phi3-partial", pairs(5), 1),  # fused qkv / gate_up: several runs of rows
          Case(2, "gemma2-softcap")]  # four norms per layer, tied head


def test_ranks_read_only_their_slices_from_safetensors(tmp_path):
    """Each case saved as a converted folder (save_converted); on 2 ranks, each reads its shard
    from the safetensors files (safetensors_reader, load_rank): the bytes it reads are its
    layout's (shard_nbytes), under the whole model's, and its logits equal those of its shard of
    the model in memory, bit for bit."""
    cases = []
    for case in LOADED:
        folder = save_converted(build(case)[1], offline_tokenizer(), tmp_path / case.name)
        cases.append(Case(case.world, case.kind, case.groups, case.bypass, folder=str(folder)))
    (tmp_path / "ranks").mkdir()
    job = Job(2, cases, tmp_path / "ranks")
    ranks = job.results()
    for case in cases:
        model = build(case)[1]
        whole = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: once
        layout = plan_layout(model.config, case.world)
        for r, results in enumerate(ranks):
            got = results[case.name]
            assert got["read_bytes"] == shard_nbytes(model.config, layout, r, torch.float32)
            assert got["read_bytes"] < whole, f"{case.name}: rank {r} read the whole model"
            assert got["load_rank_same"]
            assert torch.equal(got["loaded"], got["in_memory"]), f"{case.name}: rank {r}"
            print(f"{case.name} rank {r}: reads {got['read_bytes']} of {whole} bytes "
                  f"({got['read_bytes'] / whole:.2f})")


def test_sharded_checkpoint_reads_through_its_index(tmp_path):
    """A checkpoint split over several files (model.safetensors.index.json): every rank's shard
    equals its shard of the model in memory; the tied head is the embedding."""
    model = build(Case(2, "llama-gqa", ((0, 1), (2,), (3, 4)), 2))[1]
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    layout = plan_layout(model.config, 2)
    for r in range(2):
        shard = load_shard(model.config, layout, r, safetensors_reader(tmp_path))
        want = shard_from_model(model, layout, r).state_dict()
        got = shard.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
        assert shard.lm_head.weight is shard.embed_tokens.weight


# --------------------------------------------------------------------------- tests: no processes


def test_cases_cover_every_family_the_engine_runs():
    """A family whose row names the distributed engine has cases on 2 and 4 ranks."""
    for world in (2, 4):
        covered = {EXAMPLES[case.kind].model_type for case in CASES if case.world == world}
        assert covered == set(families_for("distributed")), world


def test_layout_places_lanes_and_slices():
    _, model = build(Case(4, "llama-bias", pairs(5), 1))  # 4 heads (hd 16), 4 kv heads, MLP 96
    layout = plan_layout(model.config, 4)
    assert layout.placement() == {0: (0, 1), 1: (2, 3), 2: (0, 1), 3: (2, 3), 4: (0, 1, 2, 3)}
    sl = layout.slice(3, 0)  # rank 3 in step [0, 1]: layer 1, second rank of lane (2, 3)
    assert (sl.layer, sl.member, sl.tp_rank) == (1, 1, 1)
    assert (sl.heads, sl.kv_heads, sl.columns) == (range(2, 4), range(2, 4), range(48, 96))
    sl = layout.slice(3, 2)  # the single layer 4 over all four ranks
    assert (sl.layer, sl.lane, sl.heads, sl.kv_heads, sl.columns) == (4, (0, 1, 2, 3), range(3, 4),
                                                                      range(3, 4), range(72, 96))
    assert layout.lane_sizes() == [2, 4]


def test_shard_slices_name_the_checkpoint_rows_and_columns():
    _, model = build(Case(4, "llama-bias", ((0, 1, 2, 3), (4,)), 1))
    shard = shard_from_model(model, plan_layout(model.config, 4), rank=1)
    slices = shard.tensor_slices()
    q = slices["layers.4.self_attn.q_proj.weight"]  # layer 4 over 4 ranks: head 1 = rows 16..32
    assert (q.name, q.dim, q.start, q.stop) == ("model.layers.4.self_attn.q_proj.weight", 0, 16, 32)
    down = slices["layers.4.mlp.down_proj.weight"]  # input columns 24..48 of the MLP
    assert (down.dim, down.start, down.stop) == (1, 24, 48)
    assert "layers.4.mlp.down_proj.bias" not in slices  # a row-parallel bias: lane rank 0 only
    assert slices["layers.1.self_attn.o_proj.bias"].dim is None  # layer 1 alone on rank 1: whole
    assert slices["layers.1.cqil_beta"].name == "model.layers.1.cqil_beta"
    assert torch.equal(shard.layers["4"].self_attn.q_proj.weight,
                       model.model.layers[4].self_attn.q_proj.weight[16:32])


def test_single_rank_needs_no_process_group_and_equals_transformers():
    case = Case(1, "qwen3-qknorm")
    hf, model = build(case)
    ids, mask = padded_batch()
    engine = DistributedCqil.from_model(model, rank=0, world_size=1)
    got = engine.generate(ids, mask, 4, output_logits=True)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask).logits
    assert rel(got.logits[0][mask.bool()], want[mask.bool()]) < REL_TOL


@pytest.mark.parametrize("kind, groups, world, message", [
    ("mistral-one-kv", "none", 2,
     r"lane of 2 ranks but has only 1 kv heads .*fit this grouping: 1$"),
    ("qwen3-qknorm", "none", 4, r"lane of 4 ranks.*1 kv heads.*fit this grouping: 1$"),
    ("llama-gqa", "none", 4,
     r"single layer .*lane of 4 ranks.*2 kv heads.*fit this grouping: 1, 2$"),
    ("qwen2-bias", ((0, 1), (2,), (3, 4)), 4, r"fit this grouping: 2$"),
    ("llama-gqa", ((0, 1, 2), (3, 4)), 2, r"group \[0, 1, 2\] has 3 layers.*must divide the number "
                                          r"of ranks 2; no world size fits"),
    ("llama-bias", pairs(5), 3, r"group \[0, 1\] has 2 layers.*fit this grouping: 2, 4$"),
    ("gemma3-local", "none", 2, r"lane of 2 ranks but has only 1 kv heads .*fit this grouping: 1$"),
])
def test_layout_refuses_what_does_not_fit(kind, groups, world, message):
    _, model = build(Case(world, kind, groups))
    with pytest.raises(ValueError, match=message):
        plan_layout(model.config, world)


def test_fitting_world_sizes():
    _, model = build(Case(1, "llama-bias"))  # 4 kv heads, MLP 96: lanes of 1 to 4 ranks
    assert fitting_world_sizes(model.config) == [1, 2, 3, 4]
    _, model = build(Case(2, "llama-bias", pairs(5)))
    assert fitting_world_sizes(model.config) == [2, 4]
    _, model = build(Case(2, "phi3-partial", pairs(5)))  # every family: 2 kv heads, layer 4 single
    assert fitting_world_sizes(model.config) == [2]


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, None, None), (1.0, 5, None),
                                                       (1.0, None, 0.8), (1.3, 50, 0.95)])
def test_sampling_scores_keep_what_transformers_keeps(temperature, top_k, top_p):
    """The tokens left to draw from and their probabilities are those of transformers'
    temperature, top-k and top-p warpers (fp32, 1e-6)."""
    from transformers import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(3, 257, generator=torch.Generator().manual_seed(1)) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        warpers.append(TopPLogitsWarper(top_p))
    want = warpers(None, logits.clone()).softmax(-1)
    got = sampling_scores(logits, temperature, top_k, top_p).softmax(-1)
    assert torch.equal(got > 0, want > 0)
    assert (got - want).abs().max() < 1e-6
    assert torch.equal(next_tokens(logits), logits.argmax(-1))


def test_phi3_fused_slices_take_each_ranks_q_k_v_and_gate_up_rows():
    """Phi-3's qkv_proj [(H+2G)·hd, d] and gate_up_proj [2I, d] keep their checkpoint names; a
    rank holds its heads' q rows, its kv heads' k and v rows, its columns of gate and of up,
    concatenated: the fused layout of its own slice."""
    _, model = build(Case(2, "phi3-partial"))  # 4 heads (hd 16), 2 kv heads, MLP 96
    shard = shard_from_model(model, plan_layout(model.config, 2), rank=1)
    slices = shard.tensor_slices()
    qkv = slices["layers.0.self_attn.qkv_proj.weight"]  # q rows 0..64, k 64..96, v 96..128
    assert qkv.name == "model.layers.0.self_attn.qkv_proj.weight"
    assert (qkv.dim, qkv.runs) == (0, ((32, 64), (80, 96), (112, 128)))  # heads 2-3, kv head 1
    gate_up = slices["layers.0.mlp.gate_up_proj.weight"]  # gate rows 0..96, up 96..192
    assert (gate_up.dim, gate_up.runs) == (0, ((48, 96), (144, 192)))  # columns 48..96
    whole, mine = model.model.layers[0], shard.layers["0"]
    for (got, _), (want, _), rows in zip(mine.self_attn.qkv_weights(),
                                         whole.self_attn.qkv_weights(), (32, 16, 16), strict=True):
        assert torch.equal(got, want[-rows:])  # the last heads of q, k, v: rank 1's
    for (got, _), (want, _) in zip(mine.mlp.gate_up_weights(), whole.mlp.gate_up_weights(),
                                   strict=True):
        assert torch.equal(got, want[48:])


# --------------------------------------------------------------------------- quantized folders

# (kind, groups, D): Llama with groups on lanes of one rank and layer 0 tensor-parallel; Phi-3's
# fused qkv_proj / gate_up_proj, every layer tensor-parallel (its grouping also fits 1 rank).
QUANT_MODELS = [("llama-gqa", "1-2,3-4", 1), ("phi3-partial", "none", 0)]
QUANT_CASES = [Case(2, kind, groups, d, quant=fmt) for kind, groups, d in QUANT_MODELS
               for fmt in SCHEMES]
# The kernels round activations and outputs to bf16: a row-parallel layer's partial sums are
# rounded apart (1.3e-2 measured on Phi-3, every layer split). The reference path is fp32.
QUANT_TOL = 3e-2


@pytest.fixture(scope="module")
def quant_runs(tmp_path_factory):
    """Each quantized case saved as a folder; 2 gloo ranks generate from it (one job) while this
    process computes the single-process fused engine's tokens on the same folder and, where the
    grouping fits one rank, the engine's on W = 1 (no process group)."""
    root = tmp_path_factory.mktemp("quantized")
    ids, mask = padded_batch()
    cases = []
    for c in QUANT_CASES:
        model = quantized(c.kind, c.groups, c.bypass, SCHEMES[c.quant])
        folder = save_converted(model, offline_tokenizer(), root / c.name)
        cases.append(Case(c.world, c.kind, c.groups, c.bypass, folder=str(folder), quant=c.quant))
    (root / "ranks").mkdir()
    job = Job(2, cases, root / "ranks")
    try:
        refs, single = {}, {}
        for c in cases:
            ref = load_converted(c.folder)
            assert ref.config.engine == "fused" and quantized_linears(ref)
            refs[c.name] = decode(ref, False, ids, mask, lambda x: x.argmax(-1))
            ref.set_engine("reference")
            with torch.no_grad():
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                refs[c.name] += (ref(ids, attention_mask=mask, position_ids=positions).logits,)
            if 1 in fitting_world_sizes(ref.config):
                single[c.name] = generate_quantized(c.folder, 0, 1, ids, mask)
        yield cases, job.results(), refs, single
    finally:
        job.stop()


def tie_aware_agreement(got: dict, want_tokens, want_logits) -> tuple[int, float]:
    """Compare a generation with the reference's, row by row: tokens equal until a row's first
    difference, which must be a tie of the reference within QUANT_TOL (its top two logits that
    close: the int8 head's kernel returns bf16 logits, so exact ties are common in a tiny random
    model), logits within QUANT_TOL while the inputs agree. Returns (steps compared, worst
    relative logits difference)."""
    compared, worst = 0, 0.0
    for b in range(want_tokens.shape[0]):
        for s in range(want_tokens.shape[1]):
            g, w = got["logits"][s][b, -1], want_logits[s][b, -1]
            worst = max(worst, rel(g, w))
            compared += 1
            if got["tokens"][b, s] != want_tokens[b, s]:
                top = w.topk(2).values
                margin = float((top[0] - top[1]) / w.abs().max())
                assert margin < QUANT_TOL, f"row {b} step {s}: tokens differ, margin {margin:.2e}"
                break
    return compared, worst


def test_quantized_folders_give_the_tokens_of_one_process(quant_runs):
    """int8 and int4 folders on 2 gloo ranks (each rank reading its slices of the codes and
    scales), and on 1 where the grouping fits: the greedy tokens of the single-process fused
    engine on the same folder (every token where it has no near-tie: both Llama cases; see
    tie_aware_agreement), logits within the kernels' bf16 rounding, every quantized matmul on
    the fast path, and every rank the same tokens and logits. On the reference path (fp32)
    the ranks' prompt logits equal the reference engine's within REL_TOL: the slices are exact."""
    cases, ranks, refs, single = quant_runs
    assert {c.name for c in cases if c.name in single} == {
        c.name for c in cases if c.kind == "phi3-partial"}
    for case in cases:
        want_tokens, want_logits, want_dequantized = refs[case.name]
        runs = [("W2", ranks[0][case.name])] + ([("W1", single[case.name])] if case.name in single else [])
        for world, got in runs:
            compared, worst = tie_aware_agreement(got, want_tokens, want_logits)
            print(f"{case.name} {world}: {compared} of {want_tokens.numel()} tokens compared, "
                  f"logits within {worst:.1e}")
            assert worst < QUANT_TOL, f"{case.name} {world}: logits {worst:.2e}"
            if case.kind == "llama-gqa" or world == "W1":
                assert torch.equal(got["tokens"], want_tokens), f"{case.name} {world}: tokens differ"
            assert got["modes"] == {case.quant} | {"int8"}, f"{case.name} {world}: {got['modes']}"
            assert rel(got["dequantized"], want_dequantized) < REL_TOL, f"{case.name} {world}"
        first, second = ranks[0][case.name], ranks[1][case.name]
        assert torch.equal(first["tokens"], second["tokens"]), f"{case.name}: rank 1's tokens"
        assert all(torch.equal(a, b) for a, b in zip(first["logits"], second["logits"], strict=True))


def _whole_slice(w: torch.Tensor, module: str, sl, config) -> torch.Tensor:
    """The part of a whole layer's [out, in] matrix `module` that rank slice `sl` holds
    (computed from the slice's heads and columns, independently of tensor_slices)."""
    if sl.tp_size == 1:
        return w
    hd, width = config.head_dim, config.intermediate_size
    heads = (sl.heads.start * hd, sl.heads.stop * hd)
    kv = (sl.kv_heads.start * hd, sl.kv_heads.stop * hd)
    cols = (sl.columns.start, sl.columns.stop)
    spans = qkv_row_slices(config.num_attention_heads, config.num_key_value_heads, hd)
    rows = {"q_proj": [heads], "k_proj": [kv], "v_proj": [kv], "gate_proj": [cols],
            "up_proj": [cols], "gate_up_proj": [cols, (width + cols[0], width + cols[1])],
            "qkv_proj": [(spans[n][0] + a, spans[n][0] + b)
                         for n, (a, b) in (("q", heads), ("k", kv), ("v", kv))]}
    if module in rows:
        return torch.cat([w[a:b] for a, b in rows[module]])
    a, b = heads if module == "o_proj" else cols
    return w[:, a:b]


@pytest.mark.parametrize("kind, groups, distance", QUANT_MODELS)
@pytest.mark.parametrize("fmt", list(SCHEMES))
def test_quantized_shards_dequantize_to_the_whole_models_slices(kind, groups, distance, fmt):
    """Each rank's QuantLinears (layers and lm_head) dequantize exactly to their slices of the
    whole model's dequantized weights; int4's MLP columns split 64 + 32 (whole groups of 32),
    int8's 48 + 48. A single rank's shard is the whole model's."""
    model = quantized(kind, groups, distance, SCHEMES[fmt])
    config = model.config
    for world in fitting_world_sizes(config):
        layout = plan_layout(config, world)
        if world == 2:
            split = [range(0, 64), range(64, 96)] if fmt == "int4" else [range(0, 48), range(48, 96)]
            assert layout.columns(2) == split
        for r in range(world):
            shard = shard_from_model(model, layout, r)
            mine = dict(shard.named_modules())
            linears = {name: m for name, m in mine.items() if isinstance(m, QuantLinear)}
            per_layer = len(quantized_linears(model.model.layers[0]))  # 7; Phi-3's fused: 4
            assert len(linears) == 1 + per_layer * len(shard.slices)  # + the lm_head
            assert isinstance(shard.lm_head, QuantLinear) and shard.lm_head.format == "int8"
            for name, m in linears.items():
                whole = model.get_submodule(name if name == "lm_head" else f"model.{name}")
                assert (m.format, m.group_size) == (whole.format, whole.group_size), name
                w = whole.dequantize()
                if name == "lm_head":
                    want = w[shard.vocab_rows.start:shard.vocab_rows.stop]
                else:
                    layer, module = int(name.split(".")[1]), name.rsplit(".", 1)[1]
                    sl = next(s for s in shard.slices if s.layer == layer)
                    want = _whole_slice(w, module, sl, config)
                assert torch.equal(m.dequantize(), want), f"W={world} rank {r}: {name}"


@pytest.mark.parametrize("fmt", list(SCHEMES))
def test_quantized_ranks_read_only_their_slices(tmp_path, fmt):
    """From a saved int8 / int4 folder each of 2 ranks reads its slices of the codes, scales and
    zeros only: exactly shard_nbytes (codes in their int8 / uint8), under the folder's bytes;
    the shard equals its slice of the model in memory bit for bit, and a bf16 load keeps the
    codes' dtypes."""
    model = quantized("llama-gqa", "none", 0, SCHEMES[fmt])
    folder = save_converted(model, offline_tokenizer(), tmp_path / fmt)
    whole = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    layout = plan_layout(model.config, 2)
    for r in range(2):
        read, sizes = safetensors_reader(folder), []

        def counted(sl, read=read, sizes=sizes):
            tensor = read(sl)
            sizes.append(tensor.nbytes)
            return tensor

        shard = load_shard(model.config, layout, r, counted)
        assert sum(sizes) == shard_nbytes(model.config, layout, r, torch.float32) < 0.6 * whole
        got, want = shard.state_dict(), shard_from_model(model, layout, r).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
        assert got["layers.0.mlp.down_proj.qweight"].dtype == (torch.int8 if fmt == "int8" else torch.uint8)
        half = load_rank(folder, r, 2, dtype=torch.bfloat16)
        assert half.layers["0"].mlp.down_proj.qweight.dtype == got["layers.0.mlp.down_proj.qweight"].dtype
        assert half.layers["0"].mlp.down_proj.scales.dtype == torch.bfloat16


def test_int4_split_that_cannot_align_is_refused_in_one_line():
    """int4 (group size 32) on 4 kv heads of 16 columns each: 3 ranks would split o_proj's input
    columns at 48, 4 ranks give each fewer MLP columns than a group; plan_layout names the group
    size, the columns and the world sizes that fit, in one line."""
    model = quantized("llama-bias", "none", 0, SCHEMES["int4"])
    assert fitting_world_sizes(model.config) == [1, 2]
    for world, what in ((3, r"o_proj's input columns split at column 48, not a multiple of the "
                             r"int4 group size 32"),
                        (4, r"int4 group size 32 of the MLP's 96 input columns")):
        with pytest.raises(ValueError, match=what + r".*fit this grouping: 1, 2$") as err:
            plan_layout(model.config, world)
        assert "\n" not in str(err.value)


def test_int4_columns_split_in_whole_groups_when_heads_split_unevenly():
    """3 kv heads on 2 ranks (2 + 1): the MLP columns balance the bytes as for dense weights,
    in whole groups of the int4 group size (16 here); a dense layout is unchanged."""
    _, model = build(Case(2, "llama-gqa", overrides=KV3))  # hidden 48, 6 heads of 8, MLP 96
    dense = plan_layout(model.config, 2).columns(2)
    model.config.weights = WeightScheme("int4", group_size=16).to_json()
    aligned = plan_layout(model.config, 2).columns(2)
    assert dense == [range(0, 40), range(40, 96)]  # rank 0 holds 4 of the 6 heads
    assert aligned == [range(0, 32), range(32, 96)]  # 40 columns are 2.5 groups: 2
