"""Fixtures for tests, demos, dry runs and benchmarks; nothing here is for production data.

- `mbeir`: a miniature M-BEIR tree (every task, real formats, generated images) for tests and
  `train --dry-run` stand-ins (`umarvel make-mini-mbeir`);
- `media`: small video clips;
- `models`: random-weight models at published sizes (Qwen2-VL-2B) for throughput benchmarks;
- `load`: a bounded loopback load test for `umarvel serve`.
"""
