"""The re-ranker, the distillation teacher and loss, and U-MARVEL+ fusion."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from umarvel.data.collator import EncodeItem
from umarvel.data.records import Candidate, Query
from umarvel.losses.distillation import distillation_kl
from umarvel.reranker.data import RerankPair
from umarvel.reranker.model import Reranker, _prefix_plan


@pytest.fixture(scope="module")
def reranker() -> Reranker:
    return Reranker.from_pretrained("tiny:qwen2_vl")


def _pairs() -> list[RerankPair]:
    red = Image.new("RGB", (64, 48), (200, 30, 30))
    return [
        RerankPair(EncodeItem(text="a red square", instruction="Find an image."), EncodeItem(image=red)),
        RerankPair(
            EncodeItem(image=red, text="what colour is it?"), EncodeItem(text="red, bright and shiny")
        ),
        RerankPair(EncodeItem(text="a dog"), EncodeItem(text="a cat sitting on a very long wooden fence")),
    ]


def test_kl_is_zero_when_the_teacher_equals_the_student_and_positive_otherwise() -> None:
    torch.manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    shortlist = torch.nn.functional.normalize(torch.randn(3, 5, 8), dim=-1)
    student_scores = torch.einsum("nd,nkd->nk", queries, shortlist)
    same = distillation_kl(queries, shortlist, student_scores, torch.tensor(0.05))
    other = distillation_kl(queries, shortlist, student_scores.flip(-1), torch.tensor(0.05))
    assert float(same) == pytest.approx(0.0, abs=1e-6)
    assert float(other) > 0.01


def test_kl_ignores_padded_shortlist_entries() -> None:
    torch.manual_seed(1)
    queries = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    shortlist = torch.nn.functional.normalize(torch.randn(2, 4, 8), dim=-1)
    teacher = torch.rand(2, 4)
    valid = torch.tensor([[True, True, True, False], [True, True, True, False]])
    padded = distillation_kl(queries, shortlist, teacher, 0.1, valid)
    trimmed = distillation_kl(queries, shortlist[:, :3], teacher[:, :3], 0.1)
    torch.testing.assert_close(padded, trimmed)


def test_the_teacher_side_sends_no_gradient_to_the_temperature() -> None:
    queries = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    shortlist = torch.nn.functional.normalize(torch.randn(2, 3, 8), dim=-1)
    scores = torch.einsum("nd,nkd->nk", queries, shortlist)
    temperature = torch.tensor(0.05, requires_grad=True)
    distillation_kl(queries, shortlist, scores, temperature).backward()
    # Teacher equals student: only the student path could move tau, and at the optimum its gradient is 0.
    assert float(temperature.grad) == pytest.approx(0.0, abs=1e-5)


def test_p_yes_lies_in_0_1_and_does_not_depend_on_batch_composition(reranker: Reranker) -> None:
    pairs = _pairs()
    together = reranker.score(pairs, batch_size=3)
    alone = np.array([reranker.score([p], batch_size=1)[0] for p in pairs])
    assert ((together >= 0) & (together <= 1)).all()
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_a_bfloat16_reranker_computes_its_answer_logits_in_float32() -> None:
    # bf16 logits of magnitude 16-32 round to steps of 0.125: P(Yes) then takes a handful of values.
    ranker = Reranker.from_pretrained("tiny:composed", dtype="bfloat16")
    batch = ranker.collator(_pairs())
    with torch.no_grad():
        answers = ranker.answer_logits(batch)
        vocabulary = ranker(batch)
    assert answers.dtype == torch.float32
    torch.testing.assert_close(answers, vocabulary[:, [ranker.yes_id, ranker.no_id]])
    assert (answers != answers.bfloat16().float()).any()


def test_the_prompt_ends_with_the_generation_prompt_and_holds_both_sides(reranker: Reranker) -> None:
    rendered = reranker.collator.render(_pairs()[1])
    assert rendered.rstrip().endswith("assistant")
    lowered = rendered.lower()
    assert lowered.index("query:") < lowered.index("what colour") < lowered.index("candidate:")
    batch = reranker.collator(_pairs())
    lengths = batch.inputs["attention_mask"].sum(dim=1) - 1
    torch.testing.assert_close(batch.answer_positions, lengths)


def test_a_save_and_load_round_trip_keeps_the_scores(reranker: Reranker, tmp_path: Path) -> None:
    reranker.save_pretrained(tmp_path / "r")
    again = Reranker.from_pretrained(str(tmp_path / "r"))
    np.testing.assert_allclose(again.score(_pairs()), reranker.score(_pairs()), atol=1e-6)


def test_fusion_with_weight_zero_reproduces_the_retriever_ranking() -> None:
    from umarvel.reranker.scoring import fuse

    ranked = [("a", 0.9), ("b", 0.8), ("c", 0.8), ("d", 0.1)]
    p_yes = {"a": 0.0, "b": 1.0, "c": 0.5, "d": 1.0}
    assert [d for d, _ in fuse(ranked, p_yes, 0.0, top=4)] == ["a", "b", "c", "d"]
    assert [d for d, _ in fuse(ranked, p_yes, 1.0, top=3)] == ["b", "c", "a", "d"]


def test_rows_whose_recall_re_ranking_cannot_change_are_named() -> None:
    from umarvel.data.mbeir import Row
    from umarvel.reranker.scoring import blind_rows

    rows = [Row("mscoco", 0, 5), Row("fashioniq", 7, 10)]
    assert blind_rows(rows, 3) == rows
    assert blind_rows(rows, 6) == [rows[1]]
    assert blind_rows(rows, 11) == []


def test_the_sample_is_stratified_seeded_and_covers_every_task() -> None:
    from umarvel.data.records import Query
    from umarvel.reranker.teacher import sample_queries

    queries = [Query(qid=f"{t}:{i}", text="x", task_id=t) for t in (0, 3) for i in range(40)]
    queries += [Query(qid="5:0", text="x", task_id=5), Query(qid="0:1", text="x", task_id=0)]  # a duplicate
    sample = sample_queries(queries, 0.1, seed=42)
    by_task = {t: sum(q.task_id == t for q in sample) for t in (0, 3, 5)}
    assert by_task == {0: 4, 3: 4, 5: 1}
    assert [q.qid for q in sample] == [q.qid for q in sample_queries(queries, 0.1, seed=42)]
    assert [q.qid for q in sample] != [q.qid for q in sample_queries(queries, 0.1, seed=7)]


def _record(task: int, cosine: list[float], p_yes: list[float]) -> dict:
    return {
        "qid": f"q{task}",
        "task_id": task,
        "candidates": ["a", "b", "c"],
        "positives": ["b"],
        "cosine": cosine,
        "p_yes": p_yes,
    }


def test_a_re_ranker_that_finds_the_positive_gets_weight_and_a_noisy_one_none() -> None:
    from umarvel.reranker.teacher import choose_alphas

    # Task 0: the embedder ranks the positive second and the re-ranker is sure of it; task 1: the
    # embedder ranks it first and the re-ranker prefers a negative.
    records = [_record(0, [0.9, 0.88, 0.8], [0.1, 0.9, 0.2]), _record(1, [0.8, 0.9, 0.7], [0.9, 0.2, 0.1])]
    chosen = choose_alphas(records, [0.5, 0.75, 1.0])
    assert chosen["0"][0] == 0.75  # 0.5 and 0.75 both rank it first: the larger wins the tie
    assert chosen["0"][1] == {0.5: 1.0, 0.75: 1.0, 1.0: 0.5}
    assert chosen["1"][0] == 1.0


def test_the_reciprocal_rank_is_zero_without_a_positive_and_ties_keep_list_order() -> None:
    from umarvel.reranker.teacher import choose_alphas

    tied = {"task_id": 0, "candidates": ["a", "b", "c"], "cosine": [0.5, 0.5, 0.4], "p_yes": [0, 0, 0]}
    assert choose_alphas([{**tied, "qid": "q", "positives": ["b"]}], [1.0])["0"][1][1.0] == 0.5
    assert choose_alphas([{**tied, "qid": "q", "positives": ["z"]}], [1.0])["0"][1][1.0] == 0.0


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Mine -> train R1 (2 steps) -> score the teacher, on the mini M-BEIR with tiny models."""
    from umarvel.config.io import load_config
    from umarvel.config.schema import RerankerRunConfig
    from umarvel.mining.filters import NegativeRules
    from umarvel.mining.mine import mine_negatives
    from umarvel.modeling.embedder import Embedder
    from umarvel.pipeline.train import train_reranker
    from umarvel.reranker.teacher import score_teacher
    from umarvel.testing.mbeir import build_mini_mbeir

    work = tmp_path_factory.mktemp("rerank")
    root = build_mini_mbeir(work / "M-BEIR")
    embedder = Embedder.from_pretrained("tiny:qwen2_vl")
    rules = NegativeRules(k=4, max_score=2.0, selection="sample", rank_end=20)
    negatives = mine_negatives(
        embedder,
        root,
        "query/union_train/mbeir_union_up_train.jsonl",
        "cand_pool/global/mbeir_union_train_cand_pool.jsonl",
        work / "mine",
        rules,
        shortlist_size=20,
        progress=False,
    )
    config = load_config(
        None,
        [
            "reranker.model=tiny:qwen2_vl",
            f"data.train=[{{kind: mbeir, path: {root}, negatives: {negatives}}}]",
            "train.max_steps=2",
            "train.per_device_batch_size=4",
            "train.save_steps=1000",
            "train.lora.rank=4",
            "train.lora.alpha=8",
            f"output_dir={work / 'r1'}",
        ],
        RerankerRunConfig,
    )
    model_dir = train_reranker(config, progress=False)
    teacher = score_teacher(
        embedder,
        Reranker.from_pretrained(str(model_dir)),
        root,
        work / "teacher",
        fraction=0.5,
        top=5,
        alpha=0.5,
        alpha_by_task={3: 0.9},
        chunk_queries=4,
        progress=False,
    )
    return {"root": root, "r1": model_dir, "teacher": teacher, "work": work}


def test_the_teacher_file_covers_exactly_the_sampled_queries(chain: dict[str, Path]) -> None:
    from umarvel.data.mbeir import Instructions, read_queries
    from umarvel.reranker.teacher import sample_queries

    root = chain["root"]
    queries = read_queries(
        root / "query/union_train/mbeir_union_up_train.jsonl",
        Instructions.from_tsv(root / "instructions" / "query_instructions.tsv"),
        image_root=root,
    )
    expected = [q.qid for q in sample_queries(queries, 0.5, seed=42)]
    records = [json.loads(line) for line in chain["teacher"].read_text().splitlines()]
    assert [r["qid"] for r in records] == expected
    for record in records:
        assert len(record["candidates"]) == len(record["teacher"]) == len(record["p_yes"]) <= 5
        alpha = 0.9 if record["task_id"] == 3 else 0.5
        assert record["alpha"] == alpha
        expected_teacher = alpha * np.array(record["cosine"]) + (1 - alpha) * np.array(record["p_yes"])
        np.testing.assert_allclose(record["teacher"], expected_teacher, atol=1e-5)


def test_the_shortlist_stays_inside_the_query_dataset_and_candidate_modality(chain: dict[str, Path]) -> None:
    from umarvel.data.mbeir import read_pool

    root = chain["root"]
    pool = {c.did: c for c in read_pool(root / "cand_pool/global/mbeir_union_train_cand_pool.jsonl")}
    for line in chain["teacher"].read_text().splitlines():
        record = json.loads(line)
        prefix = record["qid"].split(":")[0]
        kinds = {pool[d].modality for d in record["positives"] if d in pool}
        for did in record["candidates"]:
            assert did.split(":")[0] == prefix
            if kinds:
                assert pool[did].modality in kinds


def test_a_rerun_of_score_reuses_the_finished_parts(chain: dict[str, Path], monkeypatch) -> None:
    from umarvel.modeling.embedder import Embedder
    from umarvel.reranker.teacher import score_teacher

    ranker = Reranker.from_pretrained(str(chain["r1"]))
    before = chain["teacher"].read_text()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished part was scored again")

    monkeypatch.setattr(Reranker, "score", refuse)
    score_teacher(
        Embedder.from_pretrained("tiny:qwen2_vl"),
        ranker,
        chain["root"],
        chain["work"] / "teacher",
        fraction=0.5,
        top=5,
        alpha=0.5,
        alpha_by_task={3: 0.9},
        chunk_queries=4,
        progress=False,
    )
    assert chain["teacher"].read_text() == before


def test_a_rerun_of_score_choosing_alpha_from_a_grid_scores_nothing_again(
    chain: dict[str, Path], monkeypatch, tmp_path: Path
) -> None:
    from umarvel.modeling.embedder import Embedder
    from umarvel.reranker.teacher import choose_alphas, score_teacher

    out = tmp_path / "teacher"
    shutil.copytree(chain["work"] / "teacher", out)
    monkeypatch.setattr(Reranker, "score", lambda *a, **k: pytest.fail("a finished part was scored again"))
    path = score_teacher(
        Embedder.from_pretrained("tiny:qwen2_vl"),
        Reranker.from_pretrained(str(chain["r1"])),
        chain["root"],
        out,
        fraction=0.5,
        top=5,
        alpha_by_task={3: 0.9},
        alpha_grid=[0.25, 1.0],
        chunk_queries=4,
        progress=False,
    )
    records = [json.loads(line) for line in path.read_text().splitlines()]
    chosen = choose_alphas([r for r in records if r["task_id"] != 3], [0.25, 1.0])
    summary = json.loads((out / "summary.json").read_text())["tasks"]
    for record in records:
        alpha = 0.9 if record["task_id"] == 3 else chosen[str(record["task_id"])][0]
        assert record["alpha"] == summary[str(record["task_id"])]["alpha"] == alpha
        expected = alpha * np.array(record["cosine"]) + (1 - alpha) * np.array(record["p_yes"])
        np.testing.assert_allclose(record["teacher"], expected, atol=1e-5)


def test_stage_c_training_steps_lower_the_kl_to_the_teacher(chain: dict[str, Path]) -> None:
    from umarvel.config.io import load_config
    from umarvel.pipeline.train import build_trainer

    config = load_config(
        None,
        [
            "embedder.model=tiny:qwen2_vl",
            f"data.train=[{{kind: mbeir, path: {chain['root']}, teacher: {chain['teacher']}}}]",
            "train.loss=distill",
            "train.distill_top=5",
            "train.per_device_batch_size=4",
            "train.learning_rate=0.0001",
            "train.lora.dropout=0.0",
            "train.gradcache_chunk_size=3",
            f"output_dir={chain['work'] / 'c'}",
        ],
    )
    trainer = build_trainer(config, chain["work"] / "c")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert batch["teacher"].shape == (4, 5)

    def kl() -> float:
        trainer.model.eval()
        with torch.no_grad():
            trainer._parts.clear()
            trainer.compute_loss(trainer.model, batch)
            return trainer._parts["loss/distill_kl"][0]

    before = kl()
    trainer.create_optimizer()
    for _ in range(3):
        trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
    assert kl() < before


class _Unusable:
    """A re-ranker that fails if anything asks it for a score."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the re-ranker was used ({name})")


def test_u_marvel_plus_tunes_on_val_refuses_test_and_w0_keeps_the_retriever_runs_unscored(
    chain: dict[str, Path], tmp_path: Path
) -> None:
    from umarvel.evaluation.mbeir import evaluate_mbeir
    from umarvel.modeling.embedder import Embedder
    from umarvel.reranker.scoring import rerank_runs, tune_fusion

    root = chain["root"]
    ranker = Reranker.from_pretrained(str(chain["r1"]))
    retrieval = evaluate_mbeir(
        Embedder.from_pretrained("tiny:qwen2_vl"), root, tmp_path / "ret", "val", progress=False
    )
    rows = [s.row for s in retrieval.rows]
    with pytest.raises(ValueError, match="never on the test split"):
        tune_fusion(ranker, root, tmp_path / "ret" / "runs", tmp_path / "t", rows, split="test")
    with pytest.raises(ValueError, match="cannot change any row's headline recall"):
        tune_fusion(ranker, root, tmp_path / "ret" / "runs", tmp_path / "t", rows, "val", top=5)
    choice = tune_fusion(
        ranker, root, tmp_path / "ret" / "runs", tmp_path / "t", rows, "val", top=11, grid=(0.0, 1.0)
    )
    assert choice["weight"] in (0.0, 1.0) and choice["split"] == "val"
    strict = tune_fusion(
        ranker,
        root,
        tmp_path / "ret" / "runs",
        tmp_path / "strict",
        rows,
        "val",
        top=11,
        grid=(0.0, 1.0),
        significant_only=True,
    )
    gain = strict["gain_over_weight_0"]
    significant = gain is not None and gain["interval"][0] > 0
    assert strict["best"] == choice["weight"]
    assert strict["weight"] == (choice["weight"] if significant else 0.0)
    zero = rerank_runs(
        _Unusable(), root, tmp_path / "ret" / "runs", tmp_path / "w0", rows, "val", top=11, weights=(0.0,)
    )
    assert zero[0.0].to_json()["average"] == retrieval.to_json()["average"]


def test_a_query_reranked_at_weight_zero_keeps_its_order_without_scoring_a_pair() -> None:
    from umarvel.reranker.scoring import rerank_hits

    ranked = [("a", 0.9), ("b", 0.7), ("c", 0.4), ("d", 0.1)]
    records = {d: Candidate(did=d, text=d) for d, _ in ranked}
    query = Query(qid="q", text="q")
    assert rerank_hits(_Unusable(), query, ranked, records, top=3, weight=0.0) == ranked


def test_search_with_a_reranker_at_weight_zero_keeps_the_index_order_and_reads_the_index_folder(
    tmp_path: Path,
) -> None:
    from umarvel.config.schema import EmbedderConfig
    from umarvel.pipeline.index import build_index, search_index

    pool = tmp_path / "pool.jsonl"
    Image.new("RGB", (40, 30), (10, 200, 10)).save(tmp_path / "green.jpg")
    rows = [{"did": f"d{i}", "txt": f"item number {i} is a thing"} for i in range(6)]
    rows.append({"did": "img", "txt": None, "img_path": "green.jpg"})
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_index(EmbedderConfig(model="tiny:qwen2_vl"), pool, tmp_path / "idx", progress=False)
    plain = search_index(tmp_path / "idx", text="item number 3", k=5)
    zero = search_index(
        tmp_path / "idx", text="item number 3", k=5, reranker="tiny:qwen2_vl", fusion_weight=0.0
    )
    heavy = search_index(
        tmp_path / "idx",
        text="item number 3",
        k=7,
        reranker="tiny:qwen2_vl",
        rerank_top=7,
        fusion_weight=100.0,
    )
    assert zero.ids == plain.ids
    assert sorted(heavy.ids[0]) == sorted(r["did"] for r in rows)
    assert list(heavy.scores[0]) == sorted(heavy.scores[0], reverse=True)


def test_the_cli_tunes_on_val_stores_the_weight_and_eval_uses_it(
    chain: dict[str, Path], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from umarvel.cli import app

    root, r1 = chain["root"], tmp_path / "r1"
    shutil.copytree(chain["r1"], r1)
    runner = CliRunner()
    tune = ["tune-fusion", "--model", "tiny:qwen2_vl", "--reranker", str(r1), "--root", str(root)]
    tune += ["--out", str(tmp_path / "t")]
    refused = runner.invoke(app, [*tune, "--split", "test"])
    assert refused.exit_code == 2 and "refuses the test split" in refused.output
    tuned = runner.invoke(app, [*tune, "--rerank-top", "11", "--grid", "0.0", "--grid", "0.5"])
    assert tuned.exit_code == 0, tuned.output
    stored = json.loads((r1 / "fusion.json").read_text())
    assert stored["split"] == "val" and stored["weight"] in (0.0, 0.5)
    evaluated = runner.invoke(
        app,
        [
            "eval",
            "mbeir",
            "--model",
            "tiny:qwen2_vl",
            "--root",
            str(root),
            "--out",
            str(tmp_path / "e"),
            "--reranker",
            str(r1),
            "--rerank-top",
            "5",
        ],
    )
    assert evaluated.exit_code == 0, evaluated.output
    manifest = json.loads((tmp_path / "e" / "rerank" / "manifest.json").read_text())
    assert manifest["fusion_weight"] == stored["weight"]
    assert (tmp_path / "e" / "rerank" / "results.json").is_file()


def _frames_and_images(tmp_path: Path) -> tuple[EncodeItem, EncodeItem]:
    """A FashionIQ-style query with two earlier images, and a video candidate, through `to_item`."""
    pytest.importorskip("av")
    from umarvel.data.inputs import MediaSettings, to_item
    from umarvel.data.records import Candidate, Query
    from umarvel.testing.media import write_test_video

    paths = []
    for i, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (32, 32), colour).save(paths[-1])
    query = Query(qid="q", text="like this but blue", image=paths[2], images=(paths[0], paths[1]))
    clip = write_test_video(tmp_path / "clip.mp4", [(220, 20, 20)] * 8, fps=4)
    pixels = 300 * 28 * 28
    return (
        to_item(query, MediaSettings(pixels)),
        to_item(Candidate(did="v", video=clip), MediaSettings(pixels, video_frames=4)),
    )


def test_the_reranker_prompt_holds_every_earlier_image_of_the_query(
    reranker: Reranker, tmp_path: Path
) -> None:
    query, _ = _frames_and_images(tmp_path)
    rendered = reranker.collator.render(RerankPair(query, EncodeItem(text="a blue dress")))
    assert rendered.count("<|vision_start|>") == 3


def test_the_reranker_scores_a_video_candidate_against_a_multi_image_query(
    reranker: Reranker, tmp_path: Path
) -> None:
    query, video = _frames_and_images(tmp_path)
    score = reranker.score([RerankPair(query, video)])
    assert score.shape == (1,) and 0 <= float(score[0]) <= 1


@pytest.mark.parametrize("family", ["composed", "smolvlm"])
def test_a_reranker_without_native_video_reads_a_video_as_its_frames(family: str, tmp_path: Path) -> None:
    ranker = Reranker.from_pretrained(f"tiny:{family}")
    query, video = _frames_and_images(tmp_path)
    rendered = ranker.collator.render(RerankPair(EncodeItem(text="a red clip"), video))
    assert len(ranker.collator._images(video)) == 4 and len(rendered) > 0
    score = ranker.score([RerankPair(query, video)])
    assert score.shape == (1,) and 0 <= float(score[0]) <= 1


def test_a_rerun_of_score_with_another_reranker_scores_every_part_again(
    chain: dict[str, Path], tmp_path: Path
) -> None:
    from umarvel.modeling.embedder import Embedder
    from umarvel.reranker.teacher import score_teacher

    out = tmp_path / "teacher"
    shutil.copytree(chain["work"] / "teacher", out)
    other = Reranker.from_pretrained(str(chain["r1"]))
    weight = next(p for n, p in other.model.named_parameters() if "q_proj" in n)
    with torch.no_grad():
        weight.mul_(-3.0)
    other.backbone.digest = ""  # edited in memory: digested from its state
    settings = {"fraction": 0.5, "top": 5, "alpha": 0.5, "alpha_by_task": {3: 0.9}, "chunk_queries": 4}
    path = score_teacher(
        Embedder.from_pretrained("tiny:qwen2_vl"), other, chain["root"], out, progress=False, **settings
    )
    fresh = score_teacher(
        Embedder.from_pretrained("tiny:qwen2_vl"),
        other,
        chain["root"],
        tmp_path / "fresh",
        progress=False,
        **settings,
    )
    assert path.read_text() == fresh.read_text() != chain["teacher"].read_text()


def _shared_query_pairs() -> list[RerankPair]:
    red = Image.new("RGB", (64, 48), (200, 30, 30))
    blue = Image.new("RGB", (40, 40), (20, 30, 200))
    photo = EncodeItem(image=red, text="what colour is it?", instruction="Find a caption.")
    words = EncodeItem(text="a dog", instruction="Find an image.")
    return [
        RerankPair(photo, EncodeItem(text="red, bright")),
        RerankPair(photo, EncodeItem(image=blue)),
        RerankPair(photo, EncodeItem(text="a cat sitting on a very long wooden fence")),
        RerankPair(words, EncodeItem(image=red)),
        RerankPair(words, EncodeItem(image=blue, text="blue")),
        RerankPair(EncodeItem(image=blue, text="a blue square"), EncodeItem(text="blue")),
    ]


@pytest.fixture(scope="module")
def composed_reranker() -> Reranker:
    return Reranker.from_pretrained("tiny:composed")


def _full_forward(ranker: Reranker, batch) -> torch.Tensor:
    hidden = ranker.backbone.forward(batch.inputs)
    last = hidden[torch.arange(hidden.shape[0]), batch.answer_positions]
    return (last @ ranker.output_embedding().T).float()


def test_a_batch_sharing_its_prompt_prefix_gives_the_logits_of_full_forward_passes(
    composed_reranker: Reranker,
) -> None:
    ranker = composed_reranker.eval()
    batch = ranker.collator(_shared_query_pairs())
    with torch.no_grad():
        torch.testing.assert_close(ranker(batch), _full_forward(ranker, batch), atol=1e-5, rtol=1e-5)


def test_the_prefix_plan_shares_the_instruction_by_all_and_each_query_by_its_pairs(
    composed_reranker: Reranker,
) -> None:
    ranker = composed_reranker.eval()
    batch = ranker.collator(_shared_query_pairs())
    with torch.no_grad():
        embeds = ranker.backbone.base_model.input_embeds(
            batch.inputs["input_ids"], batch.inputs["pixel_values"]
        )
    mask = batch.inputs["attention_mask"].bool()
    common, groups, spans = _prefix_plan(embeds, mask, mask.sum(dim=1))
    assert groups == [[0, 1, 2], [3, 4], [5]]
    # The photo query shares its visual tokens and text beyond the instruction; the lone pair shares
    # the instruction only.
    assert spans[0] > common + ranker.backbone.processor.visual_tokens and spans[2] == common > 0


def test_scoring_batches_hold_whole_queries_where_they_fit(composed_reranker: Reranker) -> None:
    pairs = _shared_query_pairs()
    assert list(composed_reranker._batches(pairs, 16)) == [(0, 6)]
    assert list(composed_reranker._batches(pairs, 4)) == [(0, 3), (3, 6)]
    assert list(composed_reranker._batches(pairs, 2)) == [(0, 2), (2, 4), (4, 6)]
    scores = composed_reranker.score(pairs, batch_size=4)
    alone = np.array([composed_reranker.score([p])[0] for p in pairs])
    np.testing.assert_allclose(scores, alone, atol=1e-5)


def test_training_through_the_shared_prefix_gives_the_gradients_of_full_forward_passes(
    composed_reranker: Reranker,
) -> None:
    ranker = Reranker.from_pretrained("tiny:composed").train()
    batch = ranker.collator([p for p in _shared_query_pairs() if p.query.text != "a dog"])
    weights = [p for p in ranker.backbone.language_model.parameters() if p.requires_grad]
    ranker(batch)[:, ranker.yes_id].sum().backward()
    shared = [w.grad.clone() for w in weights]
    ranker.zero_grad()
    _full_forward(ranker, batch)[:, ranker.yes_id].sum().backward()
    for a, w in zip(shared, weights, strict=True):
        torch.testing.assert_close(a, w.grad, atol=1e-5, rtol=1e-4)
    mask = batch.inputs["attention_mask"].bool()
    with torch.no_grad():
        embeds = ranker.backbone.base_model.input_embeds(
            batch.inputs["input_ids"], batch.inputs["pixel_values"]
        )
    assert _prefix_plan(embeds, mask, mask.sum(dim=1))[0] > 0  # the instruction is shared by both queries
