"""The zero-shot suite, each benchmark read from its native layout (mbeir-protocol.md section 3).

Three task shapes cover the suite:
- `Matched`: queries against one candidate set with known targets; recall (hit rate) or mAP@k, and, for
  1:1 / 1:n caption sets, the reverse direction from the same score matrix (Flickr30K, COCO, ShareGPT4V,
  Urban-1K, VisDial, multi-round FashionIQ, CIRCO, MSR-VTT, MSVD).
- `Galleries`: each query ranks only its own small gallery, target first (GeneCIS).
- `Pairs`: an image against its true and its negative caption; accuracy (CC-Neg, SugarCrepe).

`SUITES` maps a suite name to its loader `(root) -> list of tasks`; `evaluate_zeroshot` runs them.
Recall is the hit rate (a query counts when any relevant candidate is in the top k), in percent; the
metrics live in `evaluation/metrics.py`.
"""

from __future__ import annotations

import csv
import json
import logging
import pickle
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from umarvel.data.io import InputError, read_jsonl
from umarvel.data.records import Candidate, Query
from umarvel.evaluation.metrics import hit_rate, mean_average_precision
from umarvel.retrieval.search import top_k

logger = logging.getLogger(__name__)

T2I = "Find me an everyday image that matches the given caption."
I2T = "Find an image caption describing the following everyday image."
CIRCO_INSTRUCTION = "I'm looking for a similar everyday image with the described changes."
GENECIS_CHANGE = (
    "I want you to retrieve an similar image with the described changes. Show me an image that best "
    "captures the following the described changes."
)
GENECIS_SAME = (
    "I want you to retrieve an similar image with the same attributes. Show me an image that best "
    "captures the following the same attributes."
)
VISDIAL = "Find me an everyday image that matches the given dialog."
MTFIQ = "Find me a similar fashion image based on the following multi-round modifications."
SUGARCREPE_IMAGE = "Find an image caption describing the following image."
T2V = "Find an everyday video match with caption."
SUGARCREPE_SUBSETS = (
    "add_att",
    "add_obj",
    "replace_att",
    "replace_obj",
    "replace_rel",
    "swap_att",
    "swap_obj",
)
SUGARCREPE_WITH_INSTRUCTION = {"add_att", "add_obj", "replace_att", "replace_obj"}


@dataclass
class Matched:
    """Queries ranked against candidates; `relevant[i]` are the candidate columns query i accepts.

    reverse: also score candidates -> queries from the transposed matrix (a candidate's relevant
        queries are those that accept it), reported under `reverse_label`.
    """

    name: str
    queries: list[Query]
    candidates: list[Candidate]
    relevant: list[list[int]]
    label: str
    ks: tuple[int, ...] = (1, 5, 10)
    metric: Literal["recall", "map"] = "recall"
    reverse_label: str | None = None
    candidate_instruction: str | None = None  # candidates encoded as queries with this (Urban-1K)
    video_frames: int = 0  # a fixed frame count for video candidates (MSVD: 12); 0 keeps the embedder's


@dataclass
class Galleries:
    """Each query ranks its own gallery; the target is gallery item 0."""

    name: str
    queries: list[Query]
    galleries: list[list[Candidate]]
    ks: tuple[int, ...] = (1, 2, 3)


@dataclass
class Pairs:
    """An image (encoded as a query, with an optional instruction) against its true and negative caption."""

    name: str
    images: list[Query]
    positives: list[str]
    negatives: list[str]
    groups: list[str] = field(default_factory=list)
    skipped: int = 0  # triples left out because their image is absent (reported with the results)


Task = Matched | Galleries | Pairs


def _need(path: Path) -> Path:
    if not path.exists():
        raise InputError(
            path, "not found: the suite's native layout is described in mbeir-protocol.md section 3"
        )
    return path


def _json(path: Path) -> Any:
    try:
        return json.loads(_need(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(path, f"invalid JSON: {error}") from None


def _captions_to_images(
    name: str,
    images: list[Path],
    captions: list[str],
    image_of_caption: list[int],
    text_instruction: str | None = T2I,
    image_instruction: str | None = None,
    reverse: bool = True,
) -> Matched:
    """T2I rows plus, with `reverse`, I2T from the transpose: captions are queries, images candidates."""
    queries = [Query(qid=f"t{i}", text=c, instruction=text_instruction) for i, c in enumerate(captions)]
    candidates = [Candidate(did=f"i{j}", image=p) for j, p in enumerate(images)]
    return Matched(
        name,
        queries,
        candidates,
        [[j] for j in image_of_caption],
        "T2I",
        reverse_label="I2T" if reverse else None,
        candidate_instruction=image_instruction,
    )


# ---- loaders, one per suite ---------------------------------------------------------------------------


def load_flickr30k(root: Path) -> list[Task]:
    """flickr/images/{i}.png (i = 0..999) and flickr/flickr_text.json (5,000 captions; caption j ->
    image j // 5)."""
    captions = _json(root / "flickr" / "flickr_text.json")
    count = len(captions) // 5
    images = [_need(root / "flickr" / "images" / f"{i}.png") for i in range(count)]
    return [_captions_to_images("flickr30k", images, captions, [j // 5 for j in range(len(captions))])]


def load_coco(root: Path) -> list[Task]:
    """coco_images/{i}.png and coco_text.json (caption j -> image j // 5): the 5K test set and its
    first 1K."""
    captions = _json(root / "coco_text.json")
    count = len(captions) // 5
    images = [_need(root / "coco_images" / f"{i}.png") for i in range(count)]
    tasks = [_captions_to_images("coco_5k", images, captions, [j // 5 for j in range(len(captions))])]
    if count > 1000:
        tasks.append(
            _captions_to_images("coco_1k", images[:1000], captions[:5000], [j // 5 for j in range(5000)])
        )
    return tasks


def load_sharegpt4v(root: Path) -> list[Task]:
    """sharegpt4v/datas_for_validation.json (list of {image_name, caption}); images in
    sharegpt4v/val_data/."""
    folder = root / "sharegpt4v"
    records = _json(folder / "datas_for_validation.json")
    images = [_need(folder / "val_data" / r["image_name"]) for r in records]
    return [
        _captions_to_images(
            "sharegpt4v_1k", images, [r["caption"] for r in records], list(range(len(records)))
        )
    ]


def load_urban1k(root: Path) -> list[Task]:
    """Urban1k/image/{i}.jpg and Urban1k/caption/{i}.txt (first line), i = 1..N; the image side gets the
    instruction."""
    folder = root / "Urban1k"
    numbers = sorted(int(p.stem) for p in _need(folder / "caption").glob("*.txt"))
    captions = [
        (folder / "caption" / f"{i}.txt").read_text(encoding="utf-8").splitlines()[0].strip() for i in numbers
    ]
    images = [_need(folder / "image" / f"{i}.jpg") for i in numbers]
    return [
        _captions_to_images(
            "urban1k",
            images,
            captions,
            list(range(len(numbers))),
            text_instruction=None,
            image_instruction=I2T,
        )
    ]


def load_visdial(root: Path) -> list[Task]:
    """visdial/visdial_1.0_val.json and visdial/VisualDialog_val2018/VisualDialog_val2018_{id:012d}.jpg:
    the whole 10-round dialog (no caption) -> its image."""
    data = _json(root / "visdial" / "visdial_1.0_val.json")["data"]
    questions, answers = data["questions"], data["answers"]
    texts, images = [], []
    for dialog in data["dialogs"]:
        turns = [f"Q: {questions[t['question']]}? A: {answers[t['answer']]}." for t in dialog["dialog"]]
        texts.append(" ".join(turns))
        name = f"VisualDialog_val2018_{dialog['image_id']:012d}.jpg"
        images.append(_need(root / "visdial" / "VisualDialog_val2018" / name))
    return [
        _captions_to_images(
            "visdial", images, texts, list(range(len(texts))), text_instruction=VISDIAL, reverse=False
        )
    ]


def load_circo(root: Path, split: str = "val") -> list[Task]:
    """circo/annotations/{split}.json, circo/image_info_unlabeled2017.json and circo/unlabeled2017/:
    (reference image + relative caption) -> the whole gallery; mAP@5/10/25/50 on val (test GT is hidden)."""
    folder = root / "circo"
    if split != "val":
        raise InputError(folder, "CIRCO test ground truth is hidden; evaluate locally on val")
    annotations = _json(folder / "annotations" / f"{split}.json")
    info = _json(folder / "image_info_unlabeled2017.json")["images"]
    column = {int(im["id"]): j for j, im in enumerate(info)}
    candidates = [
        Candidate(did=str(im["id"]), image=folder / "unlabeled2017" / im["file_name"]) for im in info
    ]
    queries, relevant = [], []
    for record in annotations:
        reference = folder / "unlabeled2017" / info[column[int(record["reference_img_id"])]]["file_name"]
        queries.append(
            Query(
                qid=str(record["id"]),
                text=record["relative_caption"],
                image=reference,
                instruction=CIRCO_INSTRUCTION,
            )
        )
        relevant.append([column[int(g)] for g in record["gt_img_ids"] if int(g) in column])
    return [Matched("circo_val", queries, candidates, relevant, "mAP", ks=(5, 10, 25, 50), metric="map")]


def load_genecis(root: Path) -> list[Task]:
    """genecis/annotations/{change,focus}_{object,attribute}.json: each query (reference + condition)
    ranks its own [target + gallery]. Object tasks read val2017/{id:012d}.jpg; attribute tasks read the
    pre-cropped vg/<task>/{image_id}_{query}_{slot}.jpg (slot 0 reference, 1 target, 2 + i gallery i)."""
    folder = root / "genecis"
    tasks: list[Task] = []
    for task_name in ("change_object", "focus_object", "change_attribute", "focus_attribute"):
        records = _json(folder / "annotations" / f"{task_name}.json")
        instruction = GENECIS_SAME if task_name == "focus_attribute" else GENECIS_CHANGE
        queries, galleries = [], []
        for number, record in enumerate(records):
            if task_name.endswith("object"):

                def image(entry: dict, slot: int, _n: int = number) -> Path:
                    return folder / "val2017" / f"{int(entry['val_image_id']):012d}.jpg"
            else:

                def image(entry: dict, slot: int, _n: int = number, _t: str = task_name) -> Path:
                    return folder / "vg" / _t / f"{entry['image_id']}_{_n}_{slot}.jpg"

            queries.append(
                Query(
                    qid=f"{task_name}:{number}",
                    text=record["condition"],
                    image=image(record["reference"], 0),
                    instruction=instruction,
                )
            )
            entries = [record["target"], *record["gallery"]]
            galleries.append(
                [
                    Candidate(did=f"{number}:{slot}", image=image(e, slot + 1))
                    for slot, e in enumerate(entries)
                ]
            )
        tasks.append(Galleries(f"genecis_{task_name}", queries, galleries))
    return tasks


def load_mtfiq(root: Path, fashioniq_images: Path | None = None) -> list[Task]:
    """multiturnfashion/data/all.val.json (per query: turns [_, [cap_a, cap_b], image] and target
    [_, image]), multiturnfashion/image_splits/split.all.val.json (the gallery), images
    M-BEIR/mbeir_images/fashioniq_images/{name}.jpg. The query holds every turn's image (in order) and
    the turns' texts; R@5 (also R@8, R@10)."""
    folder = root / "multiturnfashion"
    images = fashioniq_images or root / "M-BEIR" / "mbeir_images" / "fashioniq_images"
    names = _json(folder / "image_splits" / "split.all.val.json")
    column = {n: j for j, n in enumerate(names)}
    candidates = [Candidate(did=n, image=images / f"{n}.jpg") for n in names]
    queries, relevant = [], []
    for number, record in enumerate(_json(folder / "data" / "all.val.json")):
        turns = record["reference"]
        texts = [f"turn {t + 1}: {' and '.join(turn[1])}" for t, turn in enumerate(turns)]
        pictures = [images / f"{turn[2]}.jpg" for turn in turns]
        queries.append(
            Query(
                qid=str(number),
                text="; ".join(texts),
                image=pictures[-1],
                images=tuple(pictures[:-1]),
                instruction=MTFIQ,
            )
        )
        target = record["target"][1]
        if target not in column:
            raise InputError(
                folder / "data" / "all.val.json", f"query {number}: target {target} is not in the gallery"
            )
        relevant.append([column[target]])
    return [Matched("mtfiq", queries, candidates, relevant, "R", ks=(5, 8, 10))]


def load_ccneg(root: Path, last: int = 40_000) -> list[Task]:
    """ccneg/ccneg_preprocessed.pt (a torch-saved dict: image_paths, annotations[].json.caption,
    annotations[].sop_data['negative-prompt']); the test set is the last 40,000 entries; commas are
    removed from the negated caption; images relative to ccneg/."""
    import torch

    folder = root / "ccneg"
    data = torch.load(_need(folder / "ccneg_preprocessed.pt"), weights_only=False)
    paths, annotations = data["image_paths"][-last:], data["annotations"][-last:]
    images = [Query(qid=str(i), image=folder / p) for i, p in enumerate(paths)]
    positives = [a["json"]["caption"] for a in annotations]
    negatives = [a["sop_data"]["negative-prompt"].replace(",", "") for a in annotations]
    return [Pairs("ccneg", images, positives, negatives)]


def load_sugarcrepe(root: Path) -> list[Task]:
    """sugar-crepe/data/<subset>.json (id -> {filename, caption, negative_caption}) with COCO val2017/;
    or a `sugarcrepe.jsonl` (subset, image, pos, neg; images relative to `images/` beside it, found by
    name in any of its subfolders), as in ../shared/data/coco-mini. Triples whose image is absent are
    left out and counted. Accuracy overall, per subset, and the unweighted mean of the subsets."""
    rows: list[tuple[str, str, Path | None, str, str]] = []
    flat = root / "sugarcrepe.jsonl"
    if flat.is_file():
        images_dir = root / "images"
        by_name = {p.name: p for p in images_dir.rglob("*") if p.is_file()} if images_dir.is_dir() else {}
        for number, record in read_jsonl(flat):
            direct = images_dir / record["image"]
            path = direct if direct.is_file() else by_name.get(Path(record["image"]).name)
            rows.append((str(number), record["subset"], path, record["pos"], record["neg"]))
    else:
        for subset in SUGARCREPE_SUBSETS:
            for key, record in _json(root / "sugar-crepe" / "data" / f"{subset}.json").items():
                path = root / "val2017" / record["filename"]
                rows.append(
                    (
                        f"{subset}:{key}",
                        subset,
                        path if path.is_file() else None,
                        record["caption"],
                        record["negative_caption"],
                    )
                )
    present = [r for r in rows if r[2] is not None]
    if not present:
        raise InputError(root, "no SugarCrepe triple has its image here")
    if len(present) < len(rows):
        logger.warning(
            "sugarcrepe: %d of %d triples have no image here and are left out",
            len(rows) - len(present),
            len(rows),
        )
    images = [
        Query(
            qid=qid,
            image=path,
            instruction=SUGARCREPE_IMAGE if subset in SUGARCREPE_WITH_INSTRUCTION else None,
        )
        for qid, subset, path, _, _ in present
    ]
    return [
        Pairs(
            "sugarcrepe",
            images,
            [r[3] for r in present],
            [r[4] for r in present],
            [r[1] for r in present],
            skipped=len(rows) - len(present),
        )
    ]


def load_msrvtt(root: Path) -> list[Task]:
    """msrvtt/annotations/MSRVTT_JSFUSION_test.csv (video_id, sentence) and msrvtt/videos/{video_id}.mp4:
    1,000 sentences -> 1,000 videos (2 fps frame sampling)."""
    folder = root / "msrvtt"
    with _need(folder / "annotations" / "MSRVTT_JSFUSION_test.csv").open(
        encoding="utf-8", newline=""
    ) as handle:
        rows = list(csv.DictReader(handle))
    queries = [Query(qid=r["video_id"], text=r["sentence"], instruction=T2V) for r in rows]
    candidates = [
        Candidate(did=r["video_id"], video=_need(folder / "videos" / f"{r['video_id']}.mp4")) for r in rows
    ]
    return [Matched("msrvtt_1ka", queries, candidates, [[i] for i in range(len(rows))], "T2V")]


def load_msvd(root: Path) -> list[Task]:
    """MSVD/test_list.txt (video ids), MSVD/raw-captions.pkl (id -> list of token lists) and
    MSVD/YouTubeClips/{id}.avi: every caption -> the test videos (12 frames each)."""
    folder = root / "MSVD"
    ids = [line.strip() for line in _need(folder / "test_list.txt").read_text().splitlines() if line.strip()]
    with _need(folder / "raw-captions.pkl").open("rb") as handle:
        captions = pickle.load(handle)
    candidates = [Candidate(did=v, video=_need(folder / "YouTubeClips" / f"{v}.avi")) for v in ids]
    queries, relevant = [], []
    for column, video in enumerate(ids):
        for number, tokens in enumerate(captions[video]):
            queries.append(Query(qid=f"{video}:{number}", text=" ".join(tokens), instruction=T2V))
            relevant.append([column])
    return [Matched("msvd", queries, candidates, relevant, "T2V", video_frames=12)]


SUITES: dict[str, Callable[[Path], list[Task]]] = {
    "flickr30k": load_flickr30k,
    "coco": load_coco,
    "sharegpt4v": load_sharegpt4v,
    "urban1k": load_urban1k,
    "circo": load_circo,
    "genecis": load_genecis,
    "visdial": load_visdial,
    "mtfiq": load_mtfiq,
    "ccneg": load_ccneg,
    "sugarcrepe": load_sugarcrepe,
    "msrvtt": load_msrvtt,
    "msvd": load_msvd,
}


def _reverse(relevant: Sequence[Sequence[int]], columns: int) -> list[list[int]]:
    back: list[list[int]] = [[] for _ in range(columns)]
    for row, rel in enumerate(relevant):
        for column in rel:
            back[column].append(row)
    return back


# ---- evaluation -----------------------------------------------------------------------------------------


def _encode(
    embedder: Any, items: Sequence[Query | Candidate], progress: bool, instruction: str | None = None
) -> np.ndarray:
    if instruction is not None:
        items = [
            Query(qid=str(i), text=c.text, image=c.image, video=c.video, instruction=instruction)
            for i, c in enumerate(items)
        ]
        return embedder.encode_queries(items, progress=progress)
    if items and isinstance(items[0], Query):
        return embedder.encode_queries(items, progress=progress)
    return embedder.encode_candidates(items, progress=progress)


def evaluate_task(embedder: Any, task: Task, progress: bool = True) -> dict[str, float]:
    """The metrics of one task (percentages). A task's fixed frame count is encoded through a view of
    `embedder` (`with_settings`); `embedder` itself is never changed."""
    if isinstance(task, Matched):
        if task.video_frames:
            embedder = embedder.with_settings(video_frames=task.video_frames)
        queries = _encode(embedder, task.queries, progress)
        candidates = _encode(embedder, task.candidates, progress, task.candidate_instruction)
        scores = queries @ candidates.T
        if task.metric == "map":
            return {f"mAP@{k}": mean_average_precision(scores, task.relevant, k) for k in task.ks}
        result = {f"{task.label} R@{k}": hit_rate(scores, task.relevant, k) for k in task.ks}
        if task.reverse_label:
            back = _reverse(task.relevant, len(task.candidates))
            result.update({f"{task.reverse_label} R@{k}": hit_rate(scores.T, back, k) for k in task.ks})
        return result
    if isinstance(task, Galleries):
        queries = _encode(embedder, task.queries, progress)
        flat = [c for gallery in task.galleries for c in gallery]
        vectors = _encode(embedder, flat, progress)
        result: dict[str, list[float]] = defaultdict(list)
        start = 0
        for row, gallery in enumerate(task.galleries):
            scores = vectors[start : start + len(gallery)] @ queries[row]
            start += len(gallery)
            order = top_k(scores, max(task.ks))
            for k in task.ks:
                result[f"R@{k}"].append(float(0 in order[:k]))
        return {name: round(100 * float(np.mean(v)), 2) for name, v in result.items()}
    images = _encode(embedder, task.images, progress)
    positives = embedder.encode_candidates(task.positives, progress=progress)
    negatives = embedder.encode_candidates(task.negatives, progress=progress)
    correct = np.sum(images * positives, axis=1) > np.sum(images * negatives, axis=1)
    result = {"accuracy": round(100 * float(correct.mean()), 2), "pairs": float(len(correct))}
    if task.skipped:
        result["skipped (no image)"] = float(task.skipped)
    if task.groups:
        by_group: dict[str, list[bool]] = defaultdict(list)
        for group, ok in zip(task.groups, correct.tolist(), strict=True):
            by_group[group].append(ok)
        per_group = {g: round(100 * float(np.mean(v)), 2) for g, v in sorted(by_group.items())}
        result.update({f"accuracy/{g}": v for g, v in per_group.items()})
        result["accuracy (mean of subsets)"] = round(float(np.mean(list(per_group.values()))), 2)
    return result


def evaluate_zeroshot(
    embedder: Any, suite: str, root: str | Path, progress: bool = True
) -> dict[str, dict[str, float]]:
    """Run every task of `suite` found under `root`; returns task name -> metrics."""
    if suite not in SUITES:
        raise InputError(None, f"unknown suite {suite!r}; suites: {sorted(SUITES)}")
    results = {}
    for task in SUITES[suite](Path(root)):
        logger.info("%s: evaluating", task.name)
        results[task.name] = evaluate_task(embedder, task, progress)
    if suite == "genecis":
        firsts = [m["R@1"] for m in results.values()]
        results["genecis_average"] = {"R@1": round(float(np.mean(firsts)), 2)}
    return results


def render_zeroshot(results: dict[str, dict[str, float]]) -> str:
    lines = ["| task | metric | value |", "|---|---|---|"]
    for task, metrics in results.items():
        for name, value in metrics.items():
            lines.append(f"| {task} | {name} | {value} |")
    return "\n".join(lines)
