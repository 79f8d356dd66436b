"""`umarvel <command>`: thin wrappers that parse arguments, call one pipeline function, and print."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from umarvel.config.io import ConfigError, apply_override, from_dict, load_config
from umarvel.config.schema import EmbedderConfig
from umarvel.data.io import InputError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Universal multimodal retrieval with multimodal LLMs (the U-MARVEL recipe).",
)
console = Console(stderr=True)
# The small real datasets live beside the project checkout (../shared/data from the repo root).
DEFAULT_SHARED_DATA = Path(os.environ.get("UMARVEL_SHARED_DATA", "../shared/data"))


class _MainProcessFilter(logging.Filter):
    """Keep log records from the main process only (torchrun / accelerate set RANK)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return os.environ.get("RANK", "0") == "0"


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    handler = RichHandler(console=console, show_path=False)
    handler.addFilter(_MainProcessFilter())
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", handlers=[handler], force=True
    )
    for noisy in ("transformers", "httpx", "urllib3", "timm", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(error: Exception) -> None:
    console.print(f"[bold red]error:[/] {error}")
    raise typer.Exit(code=2)


def _embedder_config(model: str, overrides: list[str] | None, recipe: Path | None = None) -> EmbedderConfig:
    """Defaults, then the recipe, then `--set` overrides; a checkpoint folder's embedding definition
    (attention, pooling, instruction masking, ...) is kept unless overridden explicitly. Runtime knobs
    (dtype, batch size, image budget, ...) stay at the command's defaults."""
    import json

    from umarvel.config.schema import DEFINITION_FIELDS
    from umarvel.modeling.embedder import EMBEDDER_FILE

    config = load_config(recipe, [f"embedder.{o}" for o in overrides or []]).embedder
    explicit = {o.split("=", 1)[0].strip() for o in overrides or []}
    if recipe is not None:
        import yaml

        explicit |= set((yaml.safe_load(Path(recipe).read_text()) or {}).get("embedder", {}) or {})
    saved_file = Path(model) / EMBEDDER_FILE
    saved = json.loads(saved_file.read_text()) if saved_file.is_file() else {}
    kept = {k: v for k, v in saved.items() if k in DEFINITION_FIELDS and k not in explicit}
    return from_dict(EmbedderConfig, {**vars(config), **kept, "model": model})


@app.command()
def embed(
    model: Annotated[str, typer.Option(help="offline | tiny:<family> | hub id | checkpoint folder")],
    input: Annotated[Path, typer.Option("--input", help="JSONL with M-BEIR fields txt / img_path")],
    output: Annotated[Path, typer.Option("--output", help="output .npy (float32, L2-normalised rows)")],
    as_: Annotated[str, typer.Option("--as", help="query | candidate")] = "candidate",
    instruction: Annotated[str | None, typer.Option(help="instruction for queries without one")] = None,
    image_root: Annotated[Path | None, typer.Option(help="images are relative to this folder")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="embedder override key=value")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Embed every line of a JSONL file; resumes after an interruption."""
    from umarvel.pipeline.embed import embed_file

    if as_ not in ("query", "candidate"):
        _fail(ConfigError(f"--as must be 'query' or 'candidate', got {as_!r}"))
    if instruction is not None and as_ == "candidate":
        _fail(ConfigError("candidates never carry an instruction; use --as query"))
    try:
        config = _embedder_config(model, set_)
        path = embed_file(
            input,
            output,
            config,
            role=as_,
            instruction=instruction,  # type: ignore[arg-type]
            image_root=image_root,
            progress=progress,
        )
    except (InputError, ConfigError) as error:
        _fail(error)
    import numpy as np

    matrix = np.load(path, mmap_mode="r")
    console.print(f"wrote {path}: {matrix.shape[0]} rows x {matrix.shape[1]} dims")


@app.command()
def demo(
    output_dir: Annotated[Path, typer.Option(help="where demo.json and the manifest go")] = Path("runs/demo"),
    model: Annotated[str, typer.Option(help="model to embed with")] = "offline",
    shared_data: Annotated[Path, typer.Option(help="the shared data folder")] = DEFAULT_SHARED_DATA,
    photos: Annotated[int, typer.Option(help="Flickr8k photos to sample")] = 40,
    set_: Annotated[list[str] | None, typer.Option("--set", help="embedder override key=value")] = None,
) -> None:
    """Offline demo: embed real captions and photos with the offline backbone, show nearest neighbours."""
    from umarvel.pipeline.demo import run_demo

    try:
        run_demo(shared_data, output_dir, _embedder_config(model, set_), photos=photos, console=Console())
    except (InputError, ConfigError) as error:
        _fail(error)


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="stage recipe (YAML, only what differs from the defaults)")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="build everything with a tiny model, 2 steps")
    ] = False,
    dry_run_dir: Annotated[Path, typer.Option(help="where a dry run writes")] = Path("runs/dry-run"),
    family: Annotated[
        str, typer.Option(help="dry run: tiny family when the recipe's model is not built yet")
    ] = ("qwen2_vl"),
) -> None:
    """Run one training stage (resumes from its newest checkpoint when rerun)."""
    from umarvel.pipeline.train import dry_run as run_dry
    from umarvel.pipeline.train import train_stage

    try:
        config = load_config(recipe, overrides or [])
        if dry_run:
            summary = run_dry(config, dry_run_dir / recipe.stem, family=family)
            console.print(
                f"dry run of {recipe}: {summary['steps']} steps with {summary['model']} -> "
                f"{summary['output_dir']}"
            )
            return
        model_dir = train_stage(config)
    except (InputError, ConfigError) as error:
        _fail(error)
    console.print(f"stage {config.stage} done: {model_dir}")


@app.command()
def index(
    model: Annotated[str, typer.Option(help="offline | tiny:<family> | hub id | checkpoint folder")],
    pool: Annotated[Path, typer.Option(help="candidates JSONL (did, txt, img_path)")],
    out: Annotated[Path, typer.Option(help="index folder to write")],
    factory: Annotated[
        str, typer.Option(help="FAISS factory: Flat (exact), IVF1024,Flat, HNSW32, ...")
    ] = "Flat",
    image_root: Annotated[Path | None, typer.Option(help="images are relative to this folder")] = None,
    cache: Annotated[Path | None, typer.Option(help="content-addressed embedding cache folder")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="embedder override key=value")] = None,
) -> None:
    """Embed a pool and build a FAISS index folder (vectors, ids, manifest naming the embedder)."""
    from umarvel.pipeline.index import build_index

    try:
        built = build_index(_embedder_config(model, set_), pool, out, factory, image_root, cache)
    except (InputError, ConfigError) as error:
        _fail(error)
    console.print(f"indexed {built.size} candidates into {out} ({factory})")


@app.command()
def search(
    index_dir: Annotated[Path, typer.Argument(help="an index folder written by `umarvel index`")],
    text: Annotated[str | None, typer.Option(help="query text")] = None,
    image: Annotated[Path | None, typer.Option(help="query image")] = None,
    instruction: Annotated[str | None, typer.Option(help="task instruction")] = None,
    k: Annotated[int, typer.Option("-k", help="results to show")] = 10,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="runtime override, e.g. dtype=bfloat16 (not the model)")
    ] = None,
    reranker: Annotated[
        str | None, typer.Option(help="U-MARVEL+: re-rank the top with this re-ranker")
    ] = None,
    rerank_top: Annotated[int, typer.Option(help="candidates re-ranked")] = 50,
    fusion_weight: Annotated[
        float | None,
        typer.Option(help="w in cos + w * P(Yes); default: the re-ranker's tuned weight, else 0.1"),
    ] = None,
) -> None:
    """Search an index with a text and/or image query; prints ranked dids with scores."""
    from umarvel.pipeline.index import search_index
    from umarvel.retrieval.index import IndexMismatchError

    if text is None and image is None:
        _fail(InputError(None, "give --text, --image or both"))
    try:
        overrides: dict[str, Any] = {}
        for item in set_ or []:
            apply_override(overrides, item)
        result = search_index(
            index_dir, text, image, instruction, k, overrides, reranker, rerank_top, fusion_weight
        )
    except (InputError, ConfigError, IndexMismatchError, FileNotFoundError) as error:
        _fail(error)
    table = Table(title=f"top {k}")
    for column in ("rank", "did", "score"):
        table.add_column(column)
    for rank, (did, score) in enumerate(zip(result.ids[0], result.scores[0], strict=True), start=1):
        table.add_row(str(rank), did, f"{score:.4f}")
    Console().print(table)


@app.command()
def mine(
    model: Annotated[str, typer.Option(help="the embedder that mines (the stage-A3 checkpoint)")],
    root: Annotated[Path, typer.Option(help="the M-BEIR folder")],
    out: Annotated[Path, typer.Option(help="output folder: negatives.jsonl, audit.json, audit_scores.png")],
    queries: Annotated[
        str, typer.Option(help="query file under root")
    ] = "query/union_train/mbeir_union_up_train.jsonl",
    pool: Annotated[
        str, typer.Option(help="pool file under root")
    ] = "cand_pool/global/mbeir_union_train_cand_pool.jsonl",
    k: Annotated[int, typer.Option(help="negatives per query")] = 5,
    max_score: Annotated[
        float | None, typer.Option(help="drop candidates scoring above this (paper: 0.7)")
    ] = 0.7,
    margin: Annotated[
        float | None, typer.Option(help="drop candidates above positive score - margin")
    ] = None,
    shortlist: Annotated[int, typer.Option(help="candidates retrieved per query")] = 100,
    selection: Annotated[str, typer.Option(help="top | sample (from the rank window)")] = "top",
    rank_start: Annotated[int, typer.Option(help="rank window start, after filtering")] = 0,
    rank_end: Annotated[int, typer.Option(help="rank window end, after filtering")] = 100,
    keep_duplicates: Annotated[bool, typer.Option(help="keep copies of a positive's text/image")] = False,
    seed: Annotated[int, typer.Option(help="seed for sampled selection")] = 42,
    set_: Annotated[list[str] | None, typer.Option("--set", help="embedder override key=value")] = None,
) -> None:
    """Mine hard negatives with false-negative filtering, and write an audit of what was dropped."""
    from umarvel.config.manifest import write_manifest
    from umarvel.mining.filters import NegativeRules
    from umarvel.mining.mine import mine_negatives
    from umarvel.modeling.embedder import Embedder

    if selection not in ("top", "sample"):
        _fail(ConfigError(f"--selection must be top or sample, got {selection!r}"))
    rules = NegativeRules(
        k=k,
        max_score=max_score,
        margin=margin,
        drop_duplicates=not keep_duplicates,
        rank_start=rank_start,
        rank_end=rank_end,
        selection=selection,
        seed=seed,
    )  # type: ignore[arg-type]
    try:
        config = _embedder_config(model, set_)
        path = mine_negatives(Embedder.from_config(config), root, queries, pool, out, rules, shortlist)
    except (InputError, ConfigError) as error:
        _fail(error)
    write_manifest(
        out,
        "mine",
        config,
        inputs={"queries": root / queries, "pool": root / pool},
        extra={"rules": vars(rules), "shortlist": shortlist},
    )
    console.print(f"wrote {path} and {out / 'audit.json'}")


eval_app = typer.Typer(no_args_is_help=True, help="Evaluate: the M-BEIR table, or existing run files.")
app.add_typer(eval_app, name="eval")
POOL_SETTINGS = {"local": ("local",), "global": ("global",), "both": ("local", "global")}


@eval_app.command("mbeir")
def eval_mbeir(
    model: Annotated[str, typer.Option(help="offline | tiny:<family> | hub id | checkpoint folder")],
    root: Annotated[Path, typer.Option(help="the M-BEIR folder")],
    out: Annotated[Path, typer.Option(help="output folder (runs/, mbeir_results.tsv, results.json)")],
    split: Annotated[str, typer.Option(help="test | val")] = "test",
    pool: Annotated[str, typer.Option(help="local | global | both")] = "both",
    tasks: Annotated[list[str] | None, typer.Option(help="rows to keep, e.g. mscoco_task0")] = None,
    factory: Annotated[str, typer.Option(help="FAISS factory string")] = "Flat",
    set_: Annotated[list[str] | None, typer.Option("--set", help="embedder override key=value")] = None,
    reranker: Annotated[
        str | None, typer.Option(help="U-MARVEL+: re-rank each query's top K with this re-ranker")
    ] = None,
    rerank_top: Annotated[int, typer.Option(help="candidates re-ranked per query")] = 50,
    fusion_weight: Annotated[
        float | None,
        typer.Option(help="w in cos + w * P(Yes); default: the re-ranker's tuned weight, else 0.1"),
    ] = None,
) -> None:
    """Embed queries once, search local and global pools, write UniIR run files and the results.

    With --reranker, also re-rank (U-MARVEL+) into OUT/rerank/ and print both tables."""
    from umarvel.config.manifest import write_manifest
    from umarvel.evaluation.mbeir import evaluate_mbeir, render_table
    from umarvel.modeling.embedder import Embedder

    if pool not in POOL_SETTINGS or split not in ("test", "val"):
        _fail(
            ConfigError(f"--pool must be local, global or both and --split test or val; got {pool}, {split}")
        )
    try:
        config = _embedder_config(model, set_)
        embedder = Embedder.from_config(config)
        scores = evaluate_mbeir(embedder, root, out, split, POOL_SETTINGS[pool], tasks, factory)
    except (InputError, ConfigError) as error:
        _fail(error)
    write_manifest(
        out,
        "eval mbeir",
        config,
        inputs={"mbeir_root": root},
        extra={
            "split": split,
            "pool": pool,
            "factory": factory,
            "average": {"local": scores.average("local"), "global": scores.average("global")},
        },
    )
    Console().print(render_table(scores))
    if reranker is None:
        return
    del embedder
    from umarvel.evaluation.rerank import rerank_runs

    try:
        ranker, weight = _load_reranker(reranker, fusion_weight)
        rows = [s.row for s in scores.rows]
        reranked = rerank_runs(
            ranker,
            root,
            out / "runs",
            out / "rerank",
            rows,
            split,
            POOL_SETTINGS[pool],
            rerank_top,
            (weight,),
        )[weight]
    except (InputError, ConfigError, ValueError) as error:
        _fail(error)
    write_manifest(
        out / "rerank",
        "eval mbeir --reranker",
        config,
        inputs={"mbeir_root": root},
        extra={
            "reranker": reranker,
            "rerank_top": rerank_top,
            "fusion_weight": weight,
            "split": split,
            "average": {"local": reranked.average("local"), "global": reranked.average("global")},
        },
    )
    Console().print(f"U-MARVEL+ (top {rerank_top} re-ranked, cos + {weight} * P(Yes)):")
    Console().print(render_table(reranked))


def _load_reranker(name: str, weight: float | None) -> tuple[Any, float]:
    """The re-ranker and the fusion weight: the given one, else its tuned one, else the paper's 0.1."""
    from umarvel.evaluation.rerank import DEFAULT_WEIGHT
    from umarvel.modeling.reranker import Reranker

    ranker = Reranker.from_pretrained(name)
    if weight is None:
        weight = ranker.fusion.get("weight")
        if weight is None:
            logging.getLogger(__name__).info(
                "%s has no tuned fusion weight (umarvel tune-fusion); using %s", name, DEFAULT_WEIGHT
            )
            weight = DEFAULT_WEIGHT
    return ranker, float(weight)


@eval_app.command("zeroshot")
def eval_zeroshot(
    suite: Annotated[
        str,
        typer.Option(
            help="flickr30k | coco | sharegpt4v | urban1k | circo | genecis | visdial | "
            "mtfiq | ccneg | sugarcrepe | msrvtt | msvd"
        ),
    ],
    root: Annotated[Path, typer.Option(help="the folder holding the suite's native layout")],
    model: Annotated[str, typer.Option(help="offline | tiny:<family> | hub id | checkpoint folder")],
    out: Annotated[Path, typer.Option(help="output folder (results.json, results.md, manifest.json)")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="embedder override key=value")] = None,
) -> None:
    """A zero-shot benchmark in its native layout (mbeir-protocol.md section 3)."""
    from umarvel.config.manifest import write_manifest
    from umarvel.data.io import write_json
    from umarvel.evaluation.zeroshot import evaluate_zeroshot, render_zeroshot
    from umarvel.modeling.embedder import Embedder

    try:
        config = _embedder_config(model, set_)
        results = evaluate_zeroshot(Embedder.from_config(config), suite, root)
    except (InputError, ConfigError) as error:
        _fail(error)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    (out / "results.md").write_text(render_zeroshot(results) + "\n")
    write_manifest(
        out, "eval zeroshot", config, inputs={"root": root}, extra={"suite": suite, "results": results}
    )
    Console().print(render_zeroshot(results))


@eval_app.command("table")
def eval_table(
    run: Annotated[list[str], typer.Option(help="NAME=FOLDER of an eval mbeir output; repeatable, in order")],
    out: Annotated[Path, typer.Option(help="output stem: writes OUT.md, OUT.json and OUT.png")],
) -> None:
    """Put several M-BEIR evaluations side by side (e.g. one per pipeline stage), with a bar chart."""
    from umarvel.data.io import write_json
    from umarvel.evaluation.mbeir import compare_results, plot_comparison

    pairs = []
    for item in run:
        name, sep, folder = item.partition("=")
        if not sep or not (Path(folder) / "results.json").is_file():
            _fail(ConfigError(f"--run {item!r} must be NAME=FOLDER with a results.json in FOLDER"))
        pairs.append((name, Path(folder)))
    markdown, table = compare_results(pairs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown + "\n")
    write_json(out.with_suffix(".json"), table)
    plot_comparison(table, out.with_suffix(".png"))
    Console().print(markdown)


@eval_app.command("runs")
def eval_runs(
    root: Annotated[Path, typer.Option(help="the M-BEIR folder (qrels)")],
    runs: Annotated[Path, typer.Option(help="folder of UniIR-named run files")],
    out: Annotated[Path, typer.Option(help="output folder")],
    split: Annotated[str, typer.Option(help="test | val")] = "test",
    pool: Annotated[str, typer.Option(help="local | global | both")] = "both",
) -> None:
    """Score existing run files (any retriever's) against the qrels."""
    from umarvel.config.manifest import write_manifest
    from umarvel.evaluation.mbeir import render_table, score_runs, write_results

    try:
        scores = score_runs(root, runs, split, settings=POOL_SETTINGS[pool])
    except (InputError, KeyError) as error:
        _fail(error)
    write_results(scores, out, split)
    write_manifest(
        out, "eval runs", {"split": split, "pool": pool}, inputs={"mbeir_root": root, "runs": runs}
    )
    Console().print(render_table(scores))


@eval_app.command("beir")
def eval_beir(
    model: Annotated[str, typer.Option(help="offline | tiny:<family> | hub id | checkpoint folder")],
    folder: Annotated[Path, typer.Option(help="BEIR folder: corpus.jsonl, queries, qrels/<split>.tsv")],
    out: Annotated[Path, typer.Option(help="output folder")],
    split: Annotated[str, typer.Option(help="qrels split")] = "test",
    instruction: Annotated[str | None, typer.Option(help="query instruction")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="embedder override key=value")] = None,
) -> None:
    """BEIR text retrieval: nDCG@10, recall@100, MRR@10."""
    from umarvel.evaluation.suites import evaluate_beir

    _run_suite(
        "beir",
        model,
        out,
        set_,
        {"folder": folder},
        lambda embedder: evaluate_beir(embedder, folder, split, instruction),
    )


@eval_app.command("captions")
def eval_captions(
    model: Annotated[str, typer.Option(help="offline | tiny:<family> | hub id | checkpoint folder")],
    captions: Annotated[Path, typer.Option(help="csv with image,caption")],
    out: Annotated[Path, typer.Option(help="output folder")],
    split: Annotated[str, typer.Option(help="held split of the images: test, val, train or all")] = "test",
    image_root: Annotated[Path | None, typer.Option(help="images folder (default: beside the csv)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="embedder override key=value")] = None,
) -> None:
    """Caption retrieval both ways: recall@1/5/10 text->image and image->text."""
    from umarvel.evaluation.suites import evaluate_captions

    _run_suite(
        "captions",
        model,
        out,
        set_,
        {"captions": captions},
        lambda embedder: evaluate_captions(embedder, captions, split, image_root),
    )


def _run_suite(
    name: str,
    model: str,
    out: Path,
    set_: list[str] | None,
    inputs: dict[str, Path],
    evaluate: Callable[[Any], dict],
) -> None:
    from umarvel.config.manifest import write_manifest
    from umarvel.data.io import write_json
    from umarvel.modeling.embedder import Embedder

    try:
        config = _embedder_config(model, set_)
        embedder = Embedder.from_config(config)
        result = evaluate(embedder)
    except (InputError, ConfigError) as error:
        _fail(error)
    write_json(out / "results.json", result)
    write_manifest(out, f"eval {name}", config, inputs=inputs, extra={"results": result})
    table = Table(title=f"{name}: {model}")
    table.add_column("metric")
    table.add_column("value")
    for key, value in result.items():
        table.add_row(key, str(value))
    Console().print(table)


@app.command()
def quickstart(
    output_dir: Annotated[Path, typer.Option(help="where everything goes (rerun to resume)")] = Path(
        "runs/quickstart"
    ),
    smoke: Annotated[
        bool, typer.Option("--smoke", help="one step per stage on a tiny model (wiring check)")
    ] = False,
) -> None:
    """The whole U-MARVEL recipe at small scale, offline, on data shipped with umarvel: every stage,
    a table of metrics per stage, a chart, and an index for `umarvel search` / `umarvel serve`."""
    from umarvel.quickstart.run import run_quickstart

    try:
        run_quickstart(output_dir, "smoke" if smoke else "full", console=Console())
    except (InputError, ConfigError) as error:
        _fail(error)


@app.command()
def serve(
    index_dir: Annotated[Path, typer.Argument(help="an index folder written by `umarvel index`")],
    reranker: Annotated[str | None, typer.Option(help="a re-ranker for rerank=true requests")] = None,
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    max_k: Annotated[int, typer.Option(help="largest k a request may ask for")] = 100,
    max_image_mb: Annotated[float, typer.Option(help="largest uploaded image, MB")] = 8.0,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="runtime override, e.g. dtype=bfloat16 (not the model)")
    ] = None,
) -> None:
    """Serve an index over HTTP: a search page at /, POST /search and /embed, /health, /metrics,
    and the OpenAPI schema at /docs."""
    import uvicorn

    from umarvel.serve.app import ServeLimits, Service, create_app

    try:
        overrides: dict[str, Any] = {}
        for item in set_ or []:
            apply_override(overrides, item)
        limits = ServeLimits(max_k=max_k, max_image_bytes=int(max_image_mb * 1024 * 1024))
        service = Service(index_dir, reranker, overrides, limits)
    except (InputError, ConfigError, FileNotFoundError) as error:
        _fail(error)
    console.print(f"serving {index_dir} ({service.index.size} candidates) on http://{host}:{port}/")
    uvicorn.run(create_app(service), host=host, port=port, log_level="info")


@app.command("train-reranker")
def train_reranker_command(
    recipe: Annotated[Path, typer.Argument(help="re-ranker recipe (YAML)")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides")] = None,
) -> None:
    """Train the pointwise Yes/No re-ranker (resumes from its newest checkpoint when rerun)."""
    from umarvel.config.schema import RerankerRunConfig
    from umarvel.pipeline.rerank import train_reranker

    try:
        config = load_config(recipe, overrides or [], RerankerRunConfig)
        model_dir = train_reranker(config)
    except (InputError, ConfigError) as error:
        _fail(error)
    console.print(f"re-ranker {config.stage} done: {model_dir}")


@app.command()
def score(
    model: Annotated[str, typer.Option(help="the stage-B embedder (shortlists)")],
    reranker: Annotated[str, typer.Option(help="the re-ranker (R1) that scores the shortlists")],
    root: Annotated[Path, typer.Option(help="the M-BEIR folder")],
    out: Annotated[Path, typer.Option(help="output folder: teacher.jsonl, summary.json, parts/")],
    queries: Annotated[
        str, typer.Option(help="query file under root")
    ] = "query/union_train/mbeir_union_up_train.jsonl",
    pool: Annotated[
        str, typer.Option(help="training pool under root; local pools are cut from it")
    ] = "cand_pool/global/mbeir_union_train_cand_pool.jsonl",
    fraction: Annotated[float, typer.Option(help="share of each task's queries to score")] = 0.1,
    top: Annotated[int, typer.Option(help="shortlist size K per query")] = 50,
    alpha: Annotated[float, typer.Option(help="teacher = alpha * cos + (1 - alpha) * P(Yes)")] = 0.5,
    alpha_task: Annotated[
        list[str] | None, typer.Option(help="per-task alpha, TASK=ALPHA (e.g. 0=0.75); repeatable")
    ] = None,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 42,
    set_: Annotated[list[str] | None, typer.Option("--set", help="embedder override key=value")] = None,
) -> None:
    """Score a stratified sample of training queries' shortlists with the re-ranker: the distillation
    teacher (resumable)."""
    from umarvel.modeling.embedder import Embedder
    from umarvel.modeling.reranker import Reranker
    from umarvel.pipeline.rerank import parse_alphas, score_teacher

    try:
        config = _embedder_config(model, set_)
        embedder = Embedder.from_config(config)
        ranker = Reranker.from_pretrained(reranker)
        path = score_teacher(
            embedder,
            ranker,
            root,
            out,
            queries,
            pool,
            fraction,
            top,
            alpha,
            parse_alphas(alpha_task or []),
            seed,
        )
    except (InputError, ConfigError, ValueError) as error:
        _fail(error)
    console.print(f"wrote {path}")


@app.command("tune-fusion")
def tune_fusion_command(
    model: Annotated[str, typer.Option(help="the retriever")],
    reranker: Annotated[str, typer.Option(help="the re-ranker folder; the chosen weight is stored in it")],
    root: Annotated[Path, typer.Option(help="the M-BEIR folder")],
    out: Annotated[Path, typer.Option(help="output folder (retrieval runs, re-ranked runs, fusion.json)")],
    split: Annotated[str, typer.Option(help="a validation split (never test)")] = "val",
    rerank_top: Annotated[int, typer.Option(help="candidates re-ranked per query")] = 50,
    grid: Annotated[list[float] | None, typer.Option(help="weights to try; repeatable")] = None,
    pool: Annotated[str, typer.Option(help="local | global | both")] = "both",
    set_: Annotated[list[str] | None, typer.Option("--set", help="embedder override key=value")] = None,
) -> None:
    """Pick the U-MARVEL+ fusion weight w (cos + w * P(Yes)) on a validation split and store it with
    the re-ranker."""
    from umarvel.config.manifest import write_manifest
    from umarvel.evaluation.mbeir import evaluate_mbeir
    from umarvel.evaluation.rerank import DEFAULT_GRID, tune_fusion
    from umarvel.modeling.embedder import Embedder
    from umarvel.modeling.reranker import Reranker

    if split == "test":
        _fail(ConfigError("tune-fusion refuses the test split: tune on val, report on test"))
    if pool not in POOL_SETTINGS:
        _fail(ConfigError(f"--pool must be local, global or both, got {pool}"))
    try:
        config = _embedder_config(model, set_)
        retrieval = evaluate_mbeir(
            Embedder.from_config(config), root, out / "retrieval", split, POOL_SETTINGS[pool]
        )
        ranker = Reranker.from_pretrained(reranker)
        rows = [s.row for s in retrieval.rows]
        choice = tune_fusion(
            ranker,
            root,
            out / "retrieval" / "runs",
            out,
            rows,
            split,
            POOL_SETTINGS[pool],
            rerank_top,
            tuple(grid) if grid else DEFAULT_GRID,
        )
    except (InputError, ConfigError, ValueError) as error:
        _fail(error)
    from umarvel.modeling.reranker import store_fusion

    fusion = {**choice, "retriever": model}
    try:
        store_fusion(reranker, fusion)
    except InputError as error:
        _fail(error)
    write_manifest(out, "tune-fusion", config, inputs={"mbeir_root": root}, extra={"fusion": fusion})
    write_manifest(
        Path(reranker),
        "tune-fusion",
        config,
        inputs={"mbeir_root": root},
        extra={"fusion": fusion},
        filename="fusion_manifest.json",
    )
    table = Table(title=f"fusion weight on {split} (mean of local and global averages)")
    table.add_column("w")
    table.add_column("score")
    for weight, value in choice["by_weight"].items():
        table.add_row(weight + (" *" if float(weight) == choice["weight"] else ""), f"{value:.2f}")
    Console().print(table)


@app.command()
def pipeline(
    recipe: Annotated[Path, typer.Argument(help="multi-stage recipe (YAML: stages, output_dir, seed)")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides")] = None,
    from_: Annotated[str | None, typer.Option("--from", help="first stage to run")] = None,
    until: Annotated[str | None, typer.Option(help="last stage to run")] = None,
) -> None:
    """Run a multi-stage recipe; finished stages with an unchanged fingerprint are skipped."""
    from umarvel.pipeline.run import PipelineConfig, run_pipeline

    try:
        config = load_config(recipe, overrides or [], cls=PipelineConfig)
        status = run_pipeline(config, from_, until)
    except (InputError, ConfigError) as error:
        _fail(error)
    for name, state in status.items():
        console.print(f"{name}: {state}")


@app.command("make-mini-mbeir")
def make_mini_mbeir(
    output: Annotated[Path, typer.Argument(help="folder to create (the M-BEIR root)")],
) -> None:
    """Write the deterministic mini M-BEIR test fixture (all 16 rows, tiny images)."""
    from umarvel.config.manifest import write_manifest
    from umarvel.data.mini_mbeir import build_mini_mbeir

    root = build_mini_mbeir(output)
    write_manifest(root, "make-mini-mbeir", {"queries_per_row": 3})
    console.print(f"wrote {root}")


@app.command("make-benchmark")
def make_benchmark(
    output: Annotated[Path, typer.Argument(help="folder to create (the M-BEIR root)")],
    shared_data: Annotated[Path, typer.Option(help="the shared data folder")] = DEFAULT_SHARED_DATA,
    seed: Annotated[int, typer.Option(help="seed for every random choice")] = 0,
    max_queries: Annotated[int, typer.Option(help="cap on queries per row and split")] = 150,
) -> None:
    """Build an M-BEIR-format benchmark from the real photos and texts in ../shared/data."""
    from umarvel.config.manifest import write_manifest
    from umarvel.data.convert import benchmark_rows, build_benchmark

    try:
        root = build_benchmark(shared_data, output, seed=seed, max_queries=max_queries)
    except InputError as error:
        _fail(error)
    sources = ("flickr8k-800/captions.csv", "coco-mini/captions.csv", "clothing-small", "scifact")
    write_manifest(
        root,
        "make-benchmark",
        {"seed": seed, "max_queries": max_queries},
        inputs={name: shared_data / name for name in sources},
        extra={"rows": [row.name for row in benchmark_rows(root)]},
    )
    console.print((root / "README.md").read_text())


@app.command()
def backbones() -> None:
    """List the registered backbone families."""
    from umarvel.modeling.backbones import REGISTRY

    table = Table(title="backbone families")
    for column in ("family", "base model class", "hub ids", "bidirectional validated"):
        table.add_column(column)
    for spec in REGISTRY.values():
        table.add_row(
            spec.family,
            spec.model_class.rsplit(".", 1)[-1],
            "\n".join(spec.hub_ids) or "offline",
            "yes" if spec.bidirectional_validated else "no",
        )
    Console().print(table)


def main() -> None:  # pragma: no cover - console entry for `python -m umarvel`
    app(sys.argv[1:])
