"""GradCache under FSDP, on a lent GPU machine: accelerate runs FSDP only on accelerators, so this part
cannot run on CPU (the trainer refuses FSDP there; see `refuse_unsupported_engines`).

Run under `accelerate launch --use_fsdp ...` (cuda_check.sh does, with one process on one GPU): trains the
tiny Qwen2-VL embedder 2 steps with the plain step and with GradCache (chunks of 2) from the same start,
and writes the max abs difference of the trained weights and of the loss curves to
`<output-dir>/fsdp_gradcache.json`. With `--chunk N` it trains one run only and saves it (used by the
script itself, one run per process so each gets a fresh accelerate state).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _train(chunk: int, out: Path) -> None:
    import torch
    from tests.test_training import _trainer

    trainer = _trainer(
        out / f"chunk{chunk}", save_steps=1000, gradcache_chunk_size=chunk, hard_negatives=1, max_steps=2,
        per_device_batch_size=8,
    )  # fmt: skip
    trainer.train()
    # The full state dict (FSDP gathers it); frozen weights are equal in both runs and change nothing.
    state = trainer.accelerator.get_state_dict(trainer.model)
    weights = {n: v.detach().float().cpu() for n, v in state.items() if v.is_floating_point()}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    engine = str(trainer.accelerator.distributed_type)
    torch.save({"weights": weights, "losses": losses, "engine": engine}, out / f"chunk{chunk}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--launch", default="", help="launcher command line for the two runs")
    args = parser.parse_args()
    if args.chunk is not None:
        _train(args.chunk, args.output_dir)
        return
    import torch

    for chunk in (0, 2):
        command = [str(Path(__file__)), "--chunk", str(chunk), "--output-dir", str(args.output_dir)]
        subprocess.run([*(shlex.split(args.launch) or [sys.executable]), *command], check=True)
    plain, cached = (torch.load(args.output_dir / f"chunk{c}.pt") for c in (0, 2))
    shared = sorted(set(plain["weights"]) & set(cached["weights"]))
    losses = zip(plain["losses"], cached["losses"], strict=True)
    report = {
        "engine": cached["engine"],
        "weights_max_abs_diff": max(
            (plain["weights"][n] - cached["weights"][n]).abs().max().item() for n in shared
        ),
        "loss_max_abs_diff": max(abs(a - b) for a, b in losses),
        "tensors": len(shared),
    }
    (args.output_dir / "fsdp_gradcache.json").write_text(json.dumps(report, indent=1))
    print(report)


if __name__ == "__main__":
    main()
