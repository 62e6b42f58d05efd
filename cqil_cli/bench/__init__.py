"""`cqil bench`: latency and quality of models side by side with a baseline (docs/bench.md).

Plain functions only; cqil_cli/cli/bench.py is the thin click layer over them:
options -> plan_entries -> run_bench -> BenchReport (schema cqil.bench/1).

  options.py     BenchOptions (every setting, checked), parse_batches
  baseline.py    which model is the baseline; whether a converted folder was made from it
  runners.py     the two engines (transformers generate(), cqil's fast path), timed per token
  tokens.py      the tokenizer check and the token windows every model sees
  plan.py        Entry / BenchPlan: every model loaded once, one entry per timed row
  statistics.py  percentile, summarize, ratio
  memory.py      PeakMemory
  latency.py     run_latency: warm-up, then round-robin timed rounds
  quality.py     run_quality: teacher-forced metrics and greedy continuations vs the baseline
  report.py      BenchReport (the cqil.bench/1 document), assemble_report
  run.py         run_bench, progress_steps

Engines
  transformers  a plain checkpoint, run as its users run it today: the transformers model and
                `generate()` (dynamic cache), greedy, exactly --new-tokens tokens
  cqil          a converted folder (model_type "cqil"), run on cqil's fast path
                (fastgen.FastGenerator: static KV cache, fused groups); with --cqil-engine a
                plain checkpoint of a family cqil converts also runs there, converted with every layer its
                own step, so the gain of the engine and the gain of the grouping separate
"""
