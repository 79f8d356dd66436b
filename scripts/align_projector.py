"""Pre-align the offline backbone's projector on Flickr8k (LLaVA stage 1) and show it works as a VLM.

    python scripts/align_projector.py --data ../shared/data --steps 360 --ship

Trains on the standard Flickr8k train photos, leaving out every photo of `flickr8k-800/` (the CPU
pipeline and the quality benchmark split those into their own train and test sets), and measures, on
held-aside Flickr8k test photos (also outside `flickr8k-800/`), before and after training:
- captions given their own photo vs given another photo: how often and by how much the own photo makes
  the caption more likely (a VLM reads the image; a random projector gives about 50 %);
- zero-shot text -> image recall with no contrastive training, against chance: of the embedder
  (bidirectional attention, mean pooling), of E5-V's one-word prompt, and of the VLM itself (each
  caption ranks the photos by its log-likelihood given each of them; on the first `--likelihood-photos`
  held-aside photos, since it scores every pair).

Writes `OUT/alignment-<name>.json` (settings, loss per step, evidence) and a loss plot. `--ship` also
writes the projector to `src/umarvel/modeling/weights/` with a card recording the data, steps, loss and
this command. `--compare` trains the candidate designs (16 or 49 visual tokens, Lite0 or Lite2) on the
same budget and tabulates their evidence. `--shipped` trains nothing: it measures the projector the
package ships (against a random one) and writes `projector_alignment_shipped.*`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import logging
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from umarvel.config.manifest import machine
from umarvel.config.schema import EmbedderConfig
from umarvel.data.collator import EncodeItem
from umarvel.evaluation.metrics import bootstrap_interval
from umarvel.modeling.attention import set_attention_mode
from umarvel.modeling.backbones import Backbone, get_spec, state_digest
from umarvel.modeling.composed import build_offline, shipped_projector
from umarvel.modeling.embedder import Embedder
from umarvel.training.alignment import (
    AlignmentConfig,
    CaptionSequences,
    caption_likelihood_matrix,
    feature_maps,
    matched_vs_shuffled,
    one_word_embeddings,
    train_projector,
)

logger = logging.getLogger("align_projector")
ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "src" / "umarvel" / "modeling" / "weights"


def stable_rank(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def photo_splits(data: Path, held_photos: int) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """Train photos, every photo's captions, and held-aside test photos (a stable-hash sample), none of
    them in flickr8k-800."""
    excluded = {p.name for p in (data / "flickr8k-800" / "images").iterdir()}
    captions: dict[str, list[str]] = defaultdict(list)
    split: dict[str, str] = {}
    with (data / "flickr8k" / "captions.csv").open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            captions[row["image"]].append(row["caption"])
            split[row["image"]] = row["split"]
    train = sorted(p for p, s in split.items() if s == "train" and p not in excluded)
    test = sorted((p for p, s in split.items() if s == "test" and p not in excluded), key=stable_rank)
    logger.info(
        "%d train photos, %d test photos held aside (%d flickr8k-800 photos left out)",
        len(train),
        min(held_photos, len(test)),
        len(excluded),
    )
    return train, dict(captions), test[:held_photos]


def cached_maps(model, processor, images: Path, photos: list[str], cache: Path) -> torch.Tensor:
    """The frozen image encoder's feature maps, computed once and kept under `cache`, keyed by the
    encoder weights and the photos' bytes."""
    key = hashlib.sha256(state_digest(model.vision_tower).encode())
    for photo in photos:
        key.update(hashlib.sha256((images / photo).read_bytes()).digest())
    path = cache / f"maps-{model.config.vision_model}-{key.hexdigest()[:16]}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    started = time.perf_counter()
    maps = feature_maps(model, processor, [images / p for p in photos])
    logger.info("feature maps of %d photos in %.0f s", len(photos), time.perf_counter() - started)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(maps, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return maps


def recall(model, processor, images: Path, photos: list[str], captions: list[str]) -> dict[str, float]:
    """Zero-shot caption -> photo recall of the embedder (U-MARVEL's definition, no contrastive step)."""
    config = EmbedderConfig(model="offline", batch_size=32)
    digest = state_digest(model)
    backbone = Backbone(model, processor, get_spec("composed"), "offline", digest, digest)
    embedder = Embedder(backbone, config)
    loaded = []
    for photo in photos:
        with Image.open(images / photo) as image:
            loaded.append(EncodeItem(image=image.convert("RGB")))
    photo_vectors = embedder.encode_items(loaded, description="photos")
    text_vectors = embedder.encode_items([EncodeItem(text=c) for c in captions], description="captions")
    set_attention_mode(model.language_model, "causal")  # back to the LM's own attention
    result = recall_at(text_vectors, photo_vectors)
    result["mean_cosine_caption_photo"] = float((text_vectors @ photo_vectors.T).mean())
    return result


def recall_at(text_vectors: np.ndarray, photo_vectors: np.ndarray) -> dict[str, object]:
    """Caption i's photo is photo i: R@1/5/10 with 95% bootstrap intervals, and chance."""
    return recall_from_scores(text_vectors @ photo_vectors.T)


def recall_from_scores(sims: np.ndarray) -> dict[str, object]:
    """`sims[i, j]`: caption i against photo j, caption i's photo being photo i (ties count against)."""
    ranks = (sims > np.diag(sims)[:, None]).sum(1)
    result: dict[str, object] = {}
    for k in (1, 5, 10):
        hits = (ranks < k).astype(float)
        result[f"R@{k}"] = 100 * hits.mean()
        result[f"R@{k}_interval"] = list(bootstrap_interval([hits]))
        result[f"R@{k}_chance"] = 100 * k / sims.shape[1]
    return result


def evidence(model, processor, sequences, maps, images, held, captions, pairs: int) -> dict[str, object]:
    first = [captions[p][0] for p in held]
    result: dict[str, object] = {}
    if pairs > 0:  # every pair is a forward pass over its caption: 100 x 100 took 8 min on 2 AVX2 cores
        started = time.perf_counter()
        likelihoods = caption_likelihood_matrix(
            model, sequences, maps[:pairs], first[:pairs]
        )  # (photo, caption)
        n = len(likelihoods)
        logger.info("%d x %d caption log-likelihoods in %.0f s", n, n, time.perf_counter() - started)
        result["zero_shot_likelihood"] = recall_from_scores(likelihoods.T.numpy())
    own, other = matched_vs_shuffled(model, sequences, maps, first)
    wins = (own > other).double().numpy()
    margin = (own - other).numpy()
    tokens = np.array([len(sequences.caption_ids(c)) for c in first])
    return {
        **result,
        "photos": len(held),
        "own_photo_wins_percent": 100 * wins.mean(),
        "own_photo_wins_interval": list(bootstrap_interval([wins])),
        "log_likelihood_gain_per_caption": float(margin.mean()),
        # bootstrap_interval answers in percent of the mean; the gain is in nats
        "log_likelihood_gain_interval": [x / 100 for x in bootstrap_interval([margin])],
        "caption_nll_per_token_own_photo": float(-own.numpy().sum() / tokens.sum()),
        "caption_nll_per_token_other_photo": float(-other.numpy().sum() / tokens.sum()),
        "zero_shot": recall(model, processor, images, held, first),
        "zero_shot_one_word": recall_at(
            one_word_embeddings(model, processor, texts=first).numpy(),
            one_word_embeddings(model, processor, maps=maps).numpy(),
        ),
    }


def run_design(args, vision: str, tokens: int, steps: int, data) -> tuple[dict, torch.nn.Module]:
    train, captions, held = data
    images = args.data / "flickr8k" / "images"
    model, processor = build_offline(visual_tokens=tokens, vision_model=vision, projector="random")
    model.eval()
    sequences = CaptionSequences(processor, AlignmentConfig.max_caption_tokens)
    train_maps = cached_maps(model, processor, images, train, args.cache)
    held_maps = cached_maps(model, processor, images, held, args.cache)
    name = f"{vision}-{tokens}"
    report: dict[str, object] = {"design": name, "vision_model": vision, "visual_tokens": tokens}
    report["before"] = evidence(
        model, processor, sequences, held_maps, images, held, captions, args.likelihood_photos
    )
    logger.info("%s before: %s", name, json.dumps(report["before"]))
    config = AlignmentConfig(steps=steps, batch_size=args.batch_size, learning_rate=args.learning_rate)
    started = time.perf_counter()

    def on_step(step: int, loss: float, lr: float) -> None:
        if step % 10 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - started
            logger.info(
                "%s step %d/%d loss %.3f lr %.2e (%.1f s/step)",
                name,
                step + 1,
                steps,
                loss,
                lr,
                elapsed / (step + 1),
            )

    losses = train_projector(model, sequences, train_maps, [captions[p] for p in train], config, on_step)
    report["train_seconds"] = time.perf_counter() - started
    report["settings"] = dataclasses.asdict(config)
    report["train_photos"] = len(train)
    report["captions_seen"] = steps * args.batch_size
    report["loss"] = losses
    report["after"] = evidence(
        model, processor, sequences, held_maps, images, held, captions, args.likelihood_photos
    )
    logger.info("%s after: %s", name, json.dumps(report["after"]))
    return report, model


def run_shipped(args, vision: str, tokens: int, data) -> dict:
    """The shipped projector's evidence against a random one's, on the same held-aside photos."""
    _, captions, held = data
    images = args.data / "flickr8k" / "images"
    name = f"{vision}-{tokens}"
    card = json.loads(shipped_projector(vision, tokens).with_suffix(".json").read_text())
    report: dict[str, object] = {"design": name, "vision_model": vision, "visual_tokens": tokens}
    report["settings"] = card["settings"]
    report["shipped_card"] = {k: card[k] for k in ("command", "cpu_flags", "train_photos") if k in card}
    for phase, projector in (("before", "random"), ("after", "aligned")):
        torch.manual_seed(0)
        model, processor = build_offline(visual_tokens=tokens, vision_model=vision, projector=projector)
        model.eval()
        sequences = CaptionSequences(processor, AlignmentConfig.max_caption_tokens)
        held_maps = cached_maps(model, processor, images, held, args.cache)
        report[phase] = evidence(
            model, processor, sequences, held_maps, images, held, captions, args.likelihood_photos
        )
        logger.info("%s %s projector: %s", name, projector, json.dumps(report[phase]))
    return report


def plot(reports: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    for report in reports:
        losses = np.asarray(report["loss"])
        window = min(20, len(losses))
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        axis.plot(np.arange(window, len(losses) + 1), smooth, label=report["design"])
    axis.set_xlabel("step (16 captions)")
    axis.set_ylabel("caption NLL per token (20-step mean)")
    axis.set_title("Projector pre-alignment on Flickr8k")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def markdown(reports: list[dict], flags: str) -> str:
    lines = [
        f"CPU flags: {flags}; float32. Held-aside Flickr8k test photos; 95% bootstrap intervals.",
        "",
        "| design | steps | own photo beats another (%) | log-lik gain / caption | caption NLL / token |"
        " zero-shot R@5, embedder (chance) | zero-shot R@5, one-word prompt |"
        " zero-shot R@5, caption likelihood (chance) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for report in reports:
        for phase in ("before", "after"):
            e = report[phase]
            z = e["zero_shot"]
            one_word, likelihood = "-", "-"
            if w := e.get("zero_shot_one_word"):
                one_word = f"{w['R@5']:.1f} [{w['R@5_interval'][0]:.1f}, {w['R@5_interval'][1]:.1f}]"
            if g := e.get("zero_shot_likelihood"):
                low, high = g["R@5_interval"]
                likelihood = f"{g['R@5']:.1f} [{low:.1f}, {high:.1f}] ({g['R@5_chance']:.1f})"
            steps = 0 if phase == "before" else report["settings"]["steps"]
            lines.append(
                f"| {report['design']} | {steps} | {e['own_photo_wins_percent']:.1f} "
                f"[{e['own_photo_wins_interval'][0]:.1f}, {e['own_photo_wins_interval'][1]:.1f}] | "
                f"{e['log_likelihood_gain_per_caption']:.2f} | {e['caption_nll_per_token_own_photo']:.2f} | "
                f"{z['R@5']:.1f} [{z['R@5_interval'][0]:.1f}, {z['R@5_interval'][1]:.1f}] "
                f"({z['R@5_chance']:.1f}) | {one_word} | {likelihood} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "align-cache")
    parser.add_argument("--vision", default="efficientnet_lite0")
    parser.add_argument("--visual-tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=360)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--held-photos", type=int, default=500)
    parser.add_argument(
        "--likelihood-photos",
        type=int,
        default=100,
        help="held-aside photos ranked by caption likelihood (0: skip; 100 costs ~8 min per evidence)",
    )
    parser.add_argument("--compare", action="store_true", help="train every candidate design, same budget")
    parser.add_argument("--shipped", action="store_true", help="measure the shipped projector, train nothing")
    parser.add_argument("--ship", action="store_true", help="write the projector into the package")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    flags = " ".join(machine()["cpu_flags"]) or "none of avx2/avx512f/avx512_bf16/amx_bf16"
    data = photo_splits(args.data, args.held_photos)
    designs = (
        [("efficientnet_lite0", 16), ("efficientnet_lite0", 49), ("efficientnet_lite2", 16)]
        if args.compare
        else [(args.vision, args.visual_tokens)]
    )
    reports = []
    if args.shipped:
        report = run_shipped(args, args.vision, args.visual_tokens, data)
        report["cpu_flags"] = flags
        report["command"] = shlex.join([Path(sys.executable).name, *sys.argv])
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "projector_alignment_shipped.json").write_text(json.dumps([report], indent=2) + "\n")
        (args.out / "projector_alignment_shipped.md").write_text(markdown([report], flags))
        print(markdown([report], flags))
        return
    for vision, tokens in designs:
        report, model = run_design(args, vision, tokens, args.steps, data)
        report["cpu_flags"] = flags
        report["command"] = shlex.join([Path(sys.executable).name, *sys.argv])
        reports.append(report)
        if args.ship:
            target = shipped_projector(vision, tokens)
            target.parent.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().contiguous() for k, v in model.projector.state_dict().items()}
            save_file(state, target)
            card = {k: v for k, v in report.items() if k != "loss"}
            card["data"] = (
                f"Flickr8k standard train split, {report['train_photos']} photos (flickr8k-800 photos left "
                "out), one random caption of five per visit"
            )
            card["final_loss_20_step_mean"] = float(np.mean(report["loss"][-20:]))
            target.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
            logger.info("shipped %s", target)
    stem = "projector_alignment_compare" if args.compare else "projector_alignment"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(reports, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(reports, flags))
    plot(reports, args.out / f"{stem}.png")
    print(markdown(reports, flags))


if __name__ == "__main__":
    main()
