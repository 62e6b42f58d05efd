"""`cqil analyze`: input similarity between layers, per-layer latency and sensitivity
(docs/analyze.md).

  options.py   AnalyzeOptions (every setting of the measurements)
  probes.py    finding any decoder's layers; the proxy that times, records, groups or skips one
  profile.py   analyze_model and the cqil.analyze/2 report
"""
