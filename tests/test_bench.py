"""`cqil bench`: the metrics against direct computation, the report schema, the errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cqil_cli.bench.baseline import resolve_baseline
from cqil_cli.bench.memory import PeakMemory
from cqil_cli.bench.options import BenchOptions, parse_batches
from cqil_cli.bench.quality import greedy_match
from cqil_cli.bench.report import SCHEMA, BenchReport
from cqil_cli.bench.statistics import percentile, summarize
from cqil_cli.core.errors import CqilError
from cqil_cli.core.metrics import TokenMetrics

SMALL = ["--prompt-len", "8", "--new-tokens", "4", "--repeats", "2", "--warmup", "1",
         "--eval-tokens", "128", "--eval-window", "32", "--greedy-prompts", "3",
         "--greedy-tokens", "5", "--device", "cpu"]

STAT_KEYS = {"p50", "p90", "mean", "stdev"}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory, tokenizer_dir):
    """Two tiny random Llamas with the same tokenizer, and one with a different tokenizer."""
    from tiny_models import save_tiny
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("bench")
    a, b, odd = (save_tiny("llama-gqa", root / name, seed, tokenizer_dir=tokenizer_dir)
                 for seed, name in enumerate(["a", "b", "odd"]))
    tokenizer = AutoTokenizer.from_pretrained(odd)
    tokenizer.add_tokens(["<cqil-not-in-the-baseline>"])
    tokenizer.save_pretrained(odd)
    return a, b, odd


@pytest.fixture(scope="module")
def converted(tiny_pair, tmp_path_factory):
    """A converted folder (layers 1-2 and 3-4 grouped) whose manifest names tiny model a."""
    from cqil_cli import __version__
    from cqil_cli.core.files import safetensors_digests
    from cqil_cli.inputs.models import load_model
    from cqil_cli.runtime.checkpoint import build_cqil_model, save_converted
    from cqil_cli.runtime.manifest import Manifest, write_manifest

    a = tiny_pair[0]
    loaded = load_model(str(a))
    model = build_cqil_model(loaded.model, "1-2,3-4")
    out = tmp_path_factory.mktemp("conv") / "grouped"
    save_converted(model, loaded.tokenizer, out)
    base = {"name": "a", "path": str(a), "weights_sha256": safetensors_digests(a)}
    write_manifest(out, Manifest(
        cqil_version=__version__, strategy="cqil", base_model=base,
        steps=[[0], [1, 2], [3, 4]], num_steps=3, num_layers=5, bypass_distance=0, devices=4,
        placement={"world_size": 4}, predicted={}, quality={}, calibration={}, tuning={},
        grouping={}))
    return out


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    words = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge "
             "boxing matches near the old river bank and sing of kings").split()
    rng = np.random.default_rng(0)
    path.write_text(" ".join(rng.choice(words, size=3000)))
    return path

# The same model on two engines in fp32: logits within ~1e-5 relative, i.e. a KL per token of
# order 1e-8 (KL ≈ ½ Σ p Δ², Δ the logit difference); the fused engine applies the norm gains
# and runs q/k/v as other kernels than transformers does, so it is not zero.
KL_FP32 = 1e-7


def bench_json(args, tmp_path, name="r.json"):
    """Run `cqil bench ARGS --json PATH` in this process (click's CliRunner on the group);
    (the parsed report, stdout). A failure shows its traceback."""
    from click.testing import CliRunner

    from cqil_cli.cli.app import cli

    path = tmp_path / name
    result = CliRunner().invoke(cli, ["bench", *map(str, args), "--json", str(path)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return json.loads(path.read_text()), result.stdout + result.stderr


# ---------------------------------------------------------------- pure functions


def test_percentile_and_summary_match_numpy():
    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0]
    for q in (0, 10, 50, 90, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    s = summarize(values)
    assert s["p50"] == pytest.approx(np.median(values))
    assert s["p90"] == pytest.approx(np.percentile(values, 90))
    assert s["mean"] == pytest.approx(np.mean(values))
    assert s["stdev"] == pytest.approx(np.std(values, ddof=1))
    assert s["n"] == len(values)
    assert summarize([2.0])["stdev"] == 0.0


@pytest.mark.parametrize("text,expected", [("1", (1,)), ("1,4,8", (1, 4, 8)), (" 2 , 3", (2, 3)),
                                           (4, (4,))])
def test_parse_batches(text, expected):
    assert parse_batches(text) == expected


@pytest.mark.parametrize("text", ["", "0", "1,,2", "a", "1,-2", "2,2", "1.5"])
def test_parse_batches_refuses_bad_lists(text):
    with pytest.raises(CqilError, match="bad batch list"):
        parse_batches(text)


def test_quality_metrics_match_direct_computation():
    torch.manual_seed(0)
    base = torch.randn(3, 7, 50) * 3
    model = base + torch.randn(3, 7, 50)
    targets = torch.randint(0, 50, (3, 7))
    acc = TokenMetrics()
    acc.update(base[:2], model[:2], targets[:2], chunk=5)  # batches and chunks must not matter
    acc.update(base[2:], model[2:], targets[2:], chunk=3)
    got = acc.result()
    p = F.log_softmax(base.double(), -1)
    q = F.log_softmax(model.double(), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean()
    nll = F.cross_entropy(model.double().reshape(-1, 50), targets.reshape(-1))
    agree = (base.argmax(-1) == model.argmax(-1)).double().mean()
    assert got["kl"] == pytest.approx(float(kl), rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert got["top1_agreement"] == pytest.approx(float(agree))
    assert got["tokens"] == 21
    same = TokenMetrics()
    same.update(base, base.clone(), targets)
    assert same.result()["kl"] < 1e-7 and same.result()["top1_agreement"] == 1.0


def test_pareto_front_keeps_the_points_nothing_beats_on_both():
    from cqil_cli.cli.plots import pareto_front

    points = [(1.0, 10.0), (0.8, 11.0), (0.9, 12.0), (0.7, 15.0), (0.7, 14.0), (1.1, 9.0)]
    assert pareto_front(points) == [(0.7, 14.0), (0.8, 11.0), (1.0, 10.0), (1.1, 9.0)]


def test_greedy_match_counts_whole_continuations():
    a = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1]])
    b = torch.tensor([[1, 2, 3], [4, 5, 0], [7, 8, 9], [0, 0, 0]])
    seq, tok = greedy_match(a, b)
    assert seq == pytest.approx(0.5)
    assert tok == pytest.approx(8 / 12)


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory(torch.device("cpu")) as mem:
        block = torch.ones(64, 1024, 1024)  # 256 MB
        del block
    assert mem.peak_mb > 0
    assert mem.extra_mb > 100 or mem.kind != "cpu_peak_rss"


def test_options_are_checked():
    with pytest.raises(CqilError, match="new-tokens"):
        BenchOptions(new_tokens=1).check()
    with pytest.raises(CqilError, match="eval-tokens"):
        BenchOptions(eval_tokens=10, eval_window=256).check()


# ---------------------------------------------------------------- baseline resolution


def test_baseline_comes_from_the_manifest(converted, tiny_pair):
    assert resolve_baseline([str(converted)], None) == (str(tiny_pair[0]), "manifest")
    assert resolve_baseline([str(converted)], "other") == ("other", "option")


def test_plain_model_without_baseline_is_refused(tiny_pair):
    with pytest.raises(CqilError, match="--baseline"):
        resolve_baseline([str(tiny_pair[0])], None)


# ---------------------------------------------------------------- the command


def test_identical_models_have_no_quality_loss_and_schema(tiny_pair, eval_text, tmp_path):
    a = tiny_pair[0]
    plot = tmp_path / "chart.png"
    report, out = bench_json([a, "--baseline", a, "--eval", eval_text, "--batch", "1,2",
                              "--plot", plot, *SMALL], tmp_path)
    assert report["schema"] == SCHEMA.tag == "cqil.bench/1"
    assert {"schema", "device", "baseline", "results", "settings"} <= set(report)
    assert report["device"]["type"] == "cpu"
    assert report["baseline"]["model"] == str(a) and report["baseline"]["source"] == "option"
    (row,) = report["results"]
    assert row["model"] == str(a) and row["engine"] == "transformers"
    for entry in (report["baseline"], row):
        lat = entry["latency"]
        assert STAT_KEYS <= set(lat["prefill_ms"]) and STAT_KEYS <= set(lat["decode_ms_per_token"])
        assert lat["decode_ms_per_token"]["n"] == 2 * 3  # repeats × (new tokens - 1)
        assert lat["tokens_per_s"] > 0 and len(lat["warmup_ms"]) == 1
        assert [b["batch"] for b in entry["latency_by_batch"]] == [1, 2]
        assert {"ppl", "kl", "top1_agreement", "greedy_match"} <= set(entry["quality"])
        assert {"decode", "prefill"} <= set(entry["ratio_to_baseline"])
    assert report["baseline"]["ratio_to_baseline"]["decode"] == 1.0
    assert row["ratio_to_baseline"]["decode"] > 0
    q = row["quality"]
    assert q["kl"] < 1e-6 and q["top1_agreement"] == 1.0 and q["greedy_match"] == 1.0
    assert q["ppl"] == pytest.approx(report["baseline"]["quality"]["ppl"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ppl" in out and "decode" in out
    assert BenchReport.from_json(report, "r.json").to_json() == report  # the document, typed


@pytest.mark.parametrize("tag,fragment", [("cqil.bench/0", "older cqil"),
                                          ("cqil.bench/2", "newer cqil"),
                                          ("cqil.analyze/1", "not a `cqil bench --json` report")])
def test_report_refuses_other_schemas(tag, fragment):
    with pytest.raises(CqilError, match="^bench.json: ") as info:
        BenchReport.from_json({"schema": tag}, "bench.json")
    assert fragment in str(info.value) and tag in str(info.value)
    assert "\n" not in str(info.value)


def test_quality_against_a_different_model_matches_direct_computation(tiny_pair, eval_text,
                                                                      tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cqil_cli.bench.tokens import bench_tokens

    a, b, _ = tiny_pair
    report, _ = bench_json([b, a, "--baseline", a, "--eval", eval_text, "--no-latency", *SMALL],
                           tmp_path)
    assert [r["model"] for r in report["results"]] == [str(b), str(a)]  # order as given
    options = BenchOptions(eval_spec=str(eval_text), eval_tokens=128, eval_window=32,
                           greedy_prompts=3, greedy_prompt_len=5, greedy_tokens=5, latency=False)
    tokens = bench_tokens(AutoTokenizer.from_pretrained(a), options)
    ma = AutoModelForCausalLM.from_pretrained(a).eval()
    mb = AutoModelForCausalLM.from_pretrained(b).eval()
    ids = tokens.eval_windows
    start = 32 // 2 - 1  # the first 16 tokens are the prompt: scored are tokens 16..31
    with torch.no_grad():
        la = F.log_softmax(ma(ids[:, :-1]).logits.double(), -1)[:, start:]
        lb = F.log_softmax(mb(ids[:, :-1]).logits.double(), -1)[:, start:]
    kl = float((la.exp() * (la - lb)).sum(-1).mean())
    ppl = math.exp(float(-lb.gather(-1, ids[:, start + 1:, None]).mean()))
    agree = float((la.argmax(-1) == lb.argmax(-1)).double().mean())
    got = report["results"][0]["quality"]
    assert got["kl"] == pytest.approx(kl, rel=1e-4) and got["kl"] > 1e-3
    assert got["ppl"] == pytest.approx(ppl, rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(agree)
    with torch.no_grad():
        ga = ma.generate(tokens.greedy_prompts, do_sample=False, max_new_tokens=5,
                         min_new_tokens=5)[:, 5:]
        gb = mb.generate(tokens.greedy_prompts, do_sample=False, max_new_tokens=5,
                         min_new_tokens=5)[:, 5:]
    assert got["greedy_match"] == pytest.approx(float((ga == gb).all(1).float().mean()))
    assert report["results"][1]["quality"]["kl"] < 1e-6
    assert report["results"][0]["latency"] is None


def test_converted_folder_runs_on_cqils_engine_against_its_base(converted, tiny_pair, eval_text,
                                                                tmp_path):
    report, _ = bench_json([converted, "--eval", eval_text, "--cqil-engine", *SMALL], tmp_path)
    assert report["baseline"]["model"] == str(tiny_pair[0])
    assert report["baseline"]["source"] == "manifest"
    assert report["baseline"]["engine"] == "transformers"
    eng = report["engine_baseline"]
    assert eng["engine"] == "cqil" and eng["quality"]["kl"] < KL_FP32
    (row,) = report["results"]
    assert row["engine"] == "cqil" and row["num_steps"] == 3 and row["groups"] == [[1, 2], [3, 4]]
    assert row["quality"]["kl"] > 0  # grouping changes the outputs: the loss is reported
    assert row["base_weights_match"] is True
    assert row["strategy"] == "cqil" and report["baseline"]["strategy"] is None  # the manifest's
    other, _ = bench_json([converted, "--baseline", tiny_pair[1], "--eval", eval_text,
                           "--no-latency", *SMALL], tmp_path, "other.json")
    assert other["results"][0]["base_weights_match"] is False
    assert row["ratio_to_baseline_same_engine"]["decode"] > 0


def test_formats_side_by_side_in_one_run(converted, tiny_pair, eval_text, tmp_path):
    """--dtype float32,bfloat16 times every MODEL in both; a quantized folder's row says its
    format and counts its codes and scales; the chart takes every format."""
    from cqil_cli.calibrate.quantize import quantize_model
    from cqil_cli.inputs.models import load_model
    from cqil_cli.runtime.checkpoint import save_converted
    from cqil_cli.runtime.manifest import read_manifest, write_manifest
    from cqil_cli.runtime.quant_cqil import WeightScheme

    loaded = load_model(str(converted))
    quantize_model(loaded.model, WeightScheme("int8"))
    q8 = tmp_path / "q8"
    save_converted(loaded.model, loaded.tokenizer, q8)
    write_manifest(q8, read_manifest(converted))
    plot = tmp_path / "front.png"
    report, out = bench_json([converted, q8, "--eval", eval_text, "--dtype", "float32,bfloat16",
                              "--plot", plot, *SMALL], tmp_path)
    rows = report["results"]
    assert [(r["dtype"], r["weights"]) for r in rows] == [
        ("float32", None), ("float32", "int8"), ("bfloat16", None), ("bfloat16", "int8")]
    assert [r["label"] for r in rows] == [f"{converted} [fp32]", f"{q8} [fp32]",
                                          f"{converted} [bf16]", f"{q8} [bf16]"]
    assert report["baseline"]["dtype"] == "float32" and report["baseline"]["weights"] is None
    assert rows[1]["weights_mb"] < 0.6 * rows[0]["weights_mb"]  # int8 codes + scales vs fp32
    assert all(r["ratio_to_baseline"]["decode"] > 0 for r in rows)
    assert "int8" in out and "bf16" in out and plot.stat().st_size > 0


def test_greedy_on_cqils_engine_equals_transformers(tiny_pair, eval_text, tmp_path):
    a = tiny_pair[0]
    report, _ = bench_json([a, "--baseline", a, "--eval", eval_text, "--cqil-engine",
                            "--no-latency", *SMALL], tmp_path)
    rows = report["results"]
    assert [r["engine"] for r in rows] == ["transformers", "cqil"]
    assert rows[1]["quality"]["greedy_match"] == 1.0 and rows[1]["quality"]["kl"] < KL_FP32


@pytest.mark.parametrize("extra,fragment", [
    (["--batch", "1,x"], "bad batch list"),
    (["--batch", "0"], "bad batch list"),
    (["--eval-tokens", "100000"], "too little evaluation text"),
    (["--device", "cuda:7"], "not available"),
    (["--baseline", "{odd}"], "tokenizers"),
    (["--json", "/no/such/dir/r.json"], "does not exist"),
    (["--dtype", "float32,float32"], "named twice"),
    (["--dtype", "float32,int3"], "unknown dtype"),
])
def test_bad_input_is_one_clear_line(extra, fragment, tiny_pair, eval_text, cqil):
    """Through main, as the console script runs it (conftest's `cqil`): exit 2, one line."""
    a, _, odd = tiny_pair
    if fragment == "not available" and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    args = ["bench", a, "--baseline", a, "--eval", eval_text, *SMALL, *extra]
    args = [str(x).replace("{odd}", str(odd)) for x in args]
    result = cqil(*args)
    code, err = result.code, result.err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("cqil: error:")]
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err


def test_plain_model_without_baseline_is_one_clear_line(tiny_pair, cqil):
    result = cqil("bench", tiny_pair[0], "--device", "cpu")
    code, err = result.code, result.err
    assert code == 2 and "--baseline" in err


def test_console_script_exit_code(tiny_pair, eval_text):
    a = tiny_pair[0]
    proc = subprocess.run([sys.executable, "-m", "cqil_cli", "bench", str(a), "--baseline",
                           str(a), "--batch", "2,,3"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("cqil: error: bad batch list")


# ---------------------------------------------------------------- the real default model


@pytest.mark.integration
def test_default_against_itself_is_the_noise_floor(tmp_path):
    report, _ = bench_json(["default", "--baseline", "default", "--prompt-len", "32",
                            "--new-tokens", "8", "--repeats", "3", "--eval-tokens", "1024",
                            "--greedy-prompts", "4", "--device", "cpu"], tmp_path)
    (row,) = report["results"]
    assert row["quality"]["kl"] < 1e-4
    assert row["quality"]["top1_agreement"] == 1.0 and row["quality"]["greedy_match"] == 1.0
    assert row["ratio_to_baseline"]["decode"] > 0 and row["ratio_to_baseline"]["prefill"] > 0


def test_layer_skipping_model_is_scored_after_a_full_depth_prompt(tiny_pair, eval_text, tmp_path):
    """A skip folder runs on cqil's engine; its quality is the perplexity of the continuation
    after each window's first half, run as its prompt (== evaluate.perplexity)."""
    from transformers import AutoTokenizer

    from cqil_cli.bench.tokens import bench_tokens
    from cqil_cli.calibrate.evaluate import perplexity
    from cqil_cli.inputs.models import load_model
    from cqil_cli.runtime.checkpoint import build_cqil_model, save_converted

    a = tiny_pair[0]
    model = build_cqil_model(load_model(str(a)).model, None, 0, skip_layers=[1, 3])
    save_converted(model, AutoTokenizer.from_pretrained(a), tmp_path / "skip")
    report, _ = bench_json([tmp_path / "skip", "--baseline", a, "--eval", eval_text, *SMALL],
                           tmp_path)
    row = report["results"][0]
    assert row["engine"] == "cqil" and report["settings"]["eval_prompt"] == 16
    assert row["num_steps"] == 3 and row["skip_layers"] == [1, 3]
    options = BenchOptions(eval_spec=str(eval_text), eval_tokens=128, eval_window=32,
                           greedy_prompts=3, greedy_prompt_len=5, greedy_tokens=5, latency=False)
    windows = bench_tokens(AutoTokenizer.from_pretrained(a), options).eval_windows
    # bench scores positions 15..30 of the 31 inputs: tokens 16..31 of each 32-token window
    expected = perplexity(model, windows, prompt_tokens=16)
    assert row["quality"]["ppl"] == pytest.approx(expected, rel=1e-4)
    assert row["quality"]["kl"] > 1e-4


def test_eval_prompt_default_fits_the_smallest_window():
    assert BenchOptions(eval_window=2, eval_tokens=2).eval_prompt_tokens == 0
    assert BenchOptions().eval_prompt_tokens == 128
    BenchOptions(eval_window=2, eval_tokens=2).check()
    with pytest.raises(CqilError, match="--eval-prompt"):
        BenchOptions(eval_prompt=255).check()


def test_bench_on_two_ranks_reports_latency_bytes_and_memory_per_rank(converted, tiny_pair,
                                                                      eval_text, tmp_path):
    """--ranks 2: the baseline (tensor-parallel) and the converted folder each timed on two
    local ranks; every rank read only its slices (bytes = its shard's) and reports its peak
    memory; the single-device measurements stay as they were."""
    from cqil_cli.inputs.ranks import safetensors_weight_bytes
    from cqil_cli.runtime.configuration_cqil import CqilConfig
    from cqil_cli.runtime.distributed_cqil import plan_layout, shard_nbytes

    report, out = bench_json([converted, "--baseline", tiny_pair[0], "--eval", eval_text,
                              "--no-quality", "--ranks", "2", *SMALL], tmp_path)
    section = report["distributed"]
    assert section["world_size"] == 2 and section["device"] == "cpu"
    assert [row["model"] for row in section["rows"]] == [str(tiny_pair[0]), str(converted)]
    assert "on 2 ranks" in out
    words = " ".join(out.split())  # the terminal may wrap the note
    assert words.count("placed on 4 ranks (manifest.json); its placement on 2 ranks is "
                       "recomputed") == 1
    for row, folder in zip(section["rows"], [tiny_pair[0], converted], strict=True):
        assert row["decode_ms_per_token"]["p50"] > 0 and row["decode_ms_per_token"]["n"] == 6
        assert row["model_weight_bytes"] == safetensors_weight_bytes(folder)
        config = CqilConfig.from_pretrained(folder) if folder == converted else None
        for r in row["ranks"]:
            assert 0 < r["weight_fraction"] < 1 and r["peak_rss_mb"] > 0
            if config is not None:
                assert r["weight_bytes"] == shard_nbytes(config, plan_layout(config, 2),
                                                          r["rank"], torch.float32)
    assert section["rows"][1]["num_steps"] == 3  # 1-2 and 3-4 grouped: 0, [1, 2], [3, 4]
    assert report["results"][0]["latency"] is not None  # one device as before
