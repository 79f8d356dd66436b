"""`umarvel quickstart`: the whole U-MARVEL recipe at small scale, offline, on data shipped in the package.

`benchmark.py` turns the shipped clothing photos into an M-BEIR-format benchmark; `run.py` runs the
stages, evaluates each, and leaves an index for `umarvel search` and `umarvel serve`.
"""
