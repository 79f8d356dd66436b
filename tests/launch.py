"""Run a umarvel command in one process and under a 2-process launcher, and measure how far apart
everything the two runs wrote is (tests/test_distributed.py and benchmarks/multiprocess_equality.py).

Every file of the two output folders is compared: arrays (.npy) and weights (.safetensors) by their
largest absolute difference; JSON, JSONL and TREC run files field by field, numbers by their difference
(relative to the value where it is above 1, as a gradient norm of 14.6 is) and everything else exactly. Provenance (manifests, stage and run records, digests), plots, training
checkpoints and timings are not results and are left out.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
SLURM_NODE = ROOT / "scripts" / "slurm" / "node.sh"
SKIPPED_FILES = {
    "manifest.json",
    "stage.json",
    "run.json",
    "umarvel_digest.json",
    "config.yaml",
    "index.faiss",  # the same vectors as embeddings.npy, compared there
}
SKIPPED_DIRS = {"checkpoints", "media"}
TIMINGS = {
    "train_seconds_this_run",
    "rerank_seconds_this_run",
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
}


class MismatchError(AssertionError):
    """The two runs wrote different files or different non-numeric values."""


@dataclass(frozen=True)
class Command:
    """A command line with `{work}` and `{out}` placeholders; `alone` / `launched` are the extra
    arguments that keep the global batch equal (per-device batch halved under 2 processes)."""

    args: tuple[str, ...]
    alone: tuple[str, ...] = ()
    launched: tuple[str, ...] = ()


RERANKER_RECIPE = """stage: R1
reranker: {{model: "tiny:qwen2_vl"}}
data:
  train:
    - {{kind: mbeir, path: {work}/M-BEIR, negatives: {work}/negatives/negatives.jsonl}}
train: {{max_steps: 2, save_steps: 1000, logging_steps: 1, lora: {{rank: 4, alpha: 8, dropout: 0.0}}}}
"""
EMBEDDER_RECIPE = """stage: A3
embedder: {{model: "tiny:qwen2_vl", shard_size: 16}}
data:
  train:
    - {{kind: mbeir, path: {work}/M-BEIR, negatives: {work}/negatives/negatives.jsonl}}
train:
  max_steps: 3
  hard_negatives: 1
  gradcache_chunk_size: 2
  gather_across_devices: true
  save_steps: 1000
  logging_steps: 1
  learning_rate: 1.0e-3
  lora: {{rank: 4, alpha: 8, dropout: 0.0}}
"""
SHARDS = ("--set", "shard_size=16")  # several shards, so both ranks encode
POOL = "{work}/M-BEIR/cand_pool/global/mbeir_union_test_cand_pool.jsonl"
COMMANDS = {
    "embed": Command(("embed", "--model", "tiny:qwen2_vl", "--input", POOL, "--image-root", "{work}/M-BEIR",
                      "--output", "{out}/e.npy", *SHARDS)),
    "index": Command(("index", "--model", "tiny:qwen2_vl", "--pool", POOL, "--image-root", "{work}/M-BEIR",
                      "--out", "{out}", *SHARDS)),
    "eval mbeir": Command(("eval", "mbeir", "--model", "tiny:qwen2_vl", "--root", "{work}/M-BEIR", "--out", "{out}",
                           "--reranker", "tiny:qwen2_vl", "--rerank-top", "5", *SHARDS)),
    "mine": Command(("mine", "--model", "tiny:qwen2_vl", "--root", "{work}/M-BEIR", "--out", "{out}",
                     "--max-score", "2", "--shortlist", "20", *SHARDS)),
    "score": Command(("score", "--model", "tiny:qwen2_vl", "--reranker", "tiny:qwen2_vl", "--root", "{work}/M-BEIR",
                      "--out", "{out}", "--fraction", "0.5", "--top", "5", *SHARDS)),
    "train": Command(("train", "{work}/embedder.yaml", "output_dir={out}"),
                     ("train.per_device_batch_size=8",), ("train.per_device_batch_size=4",)),
    "train-reranker": Command(("train-reranker", "{work}/reranker.yaml", "output_dir={out}"),
                              ("train.per_device_batch_size=4",), ("train.per_device_batch_size=2",)),
}  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launcher(name: str) -> list[str]:
    """A 2-process launch of the `umarvel` CLI: `torchrun`, or `accelerate` (on a machine without GPUs
    `--multi_gpu` starts 2 CPU processes on gloo; accelerate's `--cpu` starts only one)."""
    port = str(free_port())
    if name == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port, str(BIN / "umarvel")]
    if name == "accelerate":
        return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", port, "-m", "umarvel"]  # fmt: skip
    if name == "accelerate-zero1":  # the paper recipes' accelerate config, cut to one machine
        return [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "recipes/qwen2vl-7b/accelerate_zero1.yaml"),
                "--num_machines", "1", "--num_processes", "2", "--mixed_precision", "no",
                "--main_process_port", port, "-m", "umarvel"]  # fmt: skip
    raise ValueError(f"unknown launcher {name!r}")


def workspace(work: Path) -> Path:
    """The mini M-BEIR tree, mined negatives and the two training recipes, in `work`."""
    from umarvel.mining.filters import NegativeRules
    from umarvel.mining.mine import mine_negatives
    from umarvel.modeling.embedder import Embedder
    from umarvel.testing.mbeir import build_mini_mbeir

    root = build_mini_mbeir(work / "M-BEIR")
    mine_negatives(
        Embedder.from_pretrained("tiny:qwen2_vl"),
        root,
        "query/union_train/mbeir_union_up_train.jsonl",
        "cand_pool/global/mbeir_union_train_cand_pool.jsonl",
        work / "negatives",
        NegativeRules(k=2, max_score=2.0),
        shortlist_size=20,
        progress=False,
    )
    (work / "reranker.yaml").write_text(RERANKER_RECIPE.format(work=work))
    (work / "embedder.yaml").write_text(EMBEDDER_RECIPE.format(work=work))
    return work


def run(work: Path, name: str, out: Path, launch: str | None = None) -> None:
    """Run command `name` into `out`: alone, or under `launch`: torchrun | accelerate | slurm (two
    "nodes" of one process each, started as srun would start scripts/slurm/node.sh)."""
    command = COMMANDS[name]
    args = [a.format(work=work, out=out) for a in command.args]
    args += list(command.launched if launch else command.alone)
    if launch == "accelerate-zero1":
        args.append(f"train.deepspeed={ROOT / 'recipes/qwen2vl-7b/zero1.json'}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UMARVEL_CACHE_DIR": str(work / "digests")}
    if launch == "slurm":
        node = {"SLURM_NNODES": "2", "SLURM_JOB_ID": "1", "GPUS_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(free_port()), "TORCHRUN": str(BIN / "torchrun"), "UMARVEL": str(BIN / "umarvel")}  # fmt: skip
        nodes = [
            subprocess.Popen(
                [str(SLURM_NODE), *args],
                env={**env, **node, "SLURM_NODEID": str(rank)},
                cwd=work,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank in range(2)
        ]
        errors = [n.communicate()[1] for n in nodes]
        for started, error in zip(nodes, errors, strict=True):
            if started.returncode != 0:
                raise RuntimeError(f"{name} on 2 SLURM-style nodes failed:\n{error[-3000:]}")
        return
    prefix = launcher(launch) if launch else [str(BIN / "umarvel")]
    done = subprocess.run([*prefix, *args], capture_output=True, text=True, env=env, cwd=work)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(prefix[-1:] + args)} failed:\n{done.stderr[-3000:]}")


def difference(one: Path, two: Path) -> tuple[float, str]:
    """The largest numeric difference between everything `one` and `two` hold, and the file it is in
    (MismatchError if they hold other files, or other non-numeric values)."""
    first, second = _results(one), _results(two)
    if set(first) != set(second):
        raise MismatchError(f"different files: {sorted(set(first) ^ set(second))}")
    worst = max(((_file_difference(one / name, two / name), name) for name in first), default=(0.0, ""))
    return worst if worst[0] > 0 else (0.0, "")


def _results(folder: Path) -> list[str]:
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if not path.is_file() or path.name in SKIPPED_FILES or path.name.endswith(".manifest.json"):
            continue
        if path.suffix == ".png" or any(p in SKIPPED_DIRS or p.endswith(".parts") for p in relative.parts):
            continue
        found.append(str(relative))
    return sorted(found)


def _file_difference(a: Path, b: Path) -> float:
    if a.suffix == ".npy":
        x, y = np.load(a), np.load(b)
        if x.shape != y.shape:
            raise MismatchError(f"{a.name}: shapes {x.shape} and {y.shape}")
        return float(np.abs(x - y).max()) if x.size else 0.0
    if a.suffix == ".safetensors":
        from safetensors.numpy import load_file

        x, y = load_file(a), load_file(b)
        if x.keys() != y.keys():
            raise MismatchError(f"{a.name}: different tensors")
        return max(float(np.abs(x[k].astype(np.float64) - y[k]).max()) for k in x)
    if a.suffix == ".json":
        return _value_difference(json.loads(a.read_text()), json.loads(b.read_text()), a.name)
    lines, others = a.read_text().splitlines(), b.read_text().splitlines()
    if len(lines) != len(others):
        raise MismatchError(f"{a.name}: {len(lines)} and {len(others)} lines")
    if a.suffix == ".jsonl":
        pairs = [(json.loads(x), json.loads(y)) for x, y in zip(lines, others, strict=True)]
    else:  # TREC run files, TSV tables, markdown: field by field
        pairs = [(_fields(x), _fields(y)) for x, y in zip(lines, others, strict=True)]
    return max((_value_difference(x, y, a.name) for x, y in pairs), default=0.0)


def _fields(line: str) -> list[Any]:
    values: list[Any] = []
    for field in line.replace("|", " ").replace("\t", " ").split():
        try:
            values.append(float(field) if any(c in field for c in ".e") else field)
        except ValueError:
            values.append(field)
    return values


def _value_difference(x: Any, y: Any, where: str) -> float:
    if isinstance(x, dict) and isinstance(y, dict):
        if x.keys() != y.keys():
            raise MismatchError(f"{where}: keys {sorted(set(x) ^ set(y))} differ")
        return max((_value_difference(x[k], y[k], where) for k in x if k not in TIMINGS), default=0.0)
    if isinstance(x, list) and isinstance(y, list):
        if len(x) != len(y):
            raise MismatchError(f"{where}: lists of {len(x)} and {len(y)}")
        return max((_value_difference(a, b, where) for a, b in zip(x, y, strict=True)), default=0.0)
    if isinstance(x, float | int) and isinstance(y, float | int) and not isinstance(x, bool):
        return abs(float(x) - float(y)) / max(1.0, abs(float(x)), abs(float(y)))
    if x != y:
        raise MismatchError(f"{where}: {x!r} != {y!r}")
    return 0.0
