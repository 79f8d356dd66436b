"""Every distributed command, one process against two: how far apart everything they write is.

For each command (embed, index, eval mbeir with re-ranking, mine, score, train with GradCache and the
cross-device gather, train-reranker) on the mini M-BEIR with tiny models, runs it alone and under
`torchrun --nproc_per_node 2` (gloo, CPU); `train` also under `accelerate launch --multi_gpu
--num_processes 2`, under the paper recipes' DeepSpeed ZeRO-1 accelerate config on 2 processes, and as
two SLURM-style nodes (scripts/slurm/node.sh). The comparison is
tests/launch.py's: every output file, arrays and weights by max abs difference, JSON / JSONL / run files
field by field. Writes multiprocess_equality.json and .md to --output-dir, with wall seconds of each run
(2 processes share this machine's cores, so they are not a speed-up figure).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.digest_cost import _cpu_flags, _cpu_name
from tests.launch import COMMANDS, difference, run, workspace

CASES = [
    *((name, "torchrun") for name in COMMANDS),
    ("train", "accelerate"),
    ("train", "accelerate-zero1"),
    ("train", "slurm"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        work = workspace(Path(folder))
        alone: dict[str, tuple[Path, float]] = {}
        for name, launch in CASES:
            if name not in alone:
                started = time.perf_counter()
                run(work, name, work / f"{name}.one")
                alone[name] = (work / f"{name}.one", time.perf_counter() - started)
            started = time.perf_counter()
            run(work, name, work / f"{name}.{launch}", launch)
            seconds = time.perf_counter() - started
            worst, where = difference(alone[name][0], work / f"{name}.{launch}")
            model = alone[name][0] / "model"
            weights = difference(model, work / f"{name}.{launch}" / "model")[0] if model.is_dir() else None
            rows.append(
                {
                    "command": name,
                    "launcher": launch,
                    "max_abs_diff": worst,
                    "where": where or "(every file equal)",
                    "weights_max_abs_diff": weights,
                    "seconds_one": round(alone[name][1], 1),
                    "seconds_two": round(seconds, 1),
                }
            )
            print(rows[-1], flush=True)
    machine = {"cpu": _cpu_name(), "flags": _cpu_flags()}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine, "rows": rows}
    (args.output_dir / "multiprocess_equality.json").write_text(json.dumps(report, indent=1))
    lines = [
        "# One process against two (gloo, CPU)",
        "",
        f"{machine['cpu']}; flags: {machine['flags']}. Max abs difference over every output file (numbers "
        "above 1 relative); `where` is the file holding it; weights: the trained model alone.",
        "",
        "| command | 2 processes by | max abs diff | where | weights | s, 1 process | s, 2 processes |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['command']} | {r['launcher']} | {r['max_abs_diff']:.2g} | {r['where']} | "
        f"{'' if r['weights_max_abs_diff'] is None else format(r['weights_max_abs_diff'], '.2g')} | "
        f"{r['seconds_one']} | {r['seconds_two']} |"
        for r in rows
    ]
    (args.output_dir / "multiprocess_equality.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
