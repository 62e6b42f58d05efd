"""The latency models and the search under a latency budget (docs/convert.md).

  latency_model.py     a grouping's decode latency on one device, from a few measurements
  parallel_probe.py    the alpha-beta model's inputs measured on W local ranks
  parallel_latency.py  the distributed engine's decode latency on W ranks (alpha-beta model)
  partitions.py        the exact dynamic program over (layer, latency); start/end/P notation
"""
