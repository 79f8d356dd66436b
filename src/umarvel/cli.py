"""`umarvel <command>`: thin wrappers that parse arguments, call one pipeline function, and print."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

from umarvel.config.io import ConfigError, apply_override, from_dict, load_config
from umarvel.config.schema import EmbedderConfig
from umarvel.config.stages import (
    EvalConfig,
    IndexConfig,
    MineConfig,
    PipelineConfig,
    ScoreConfig,
    ServeConfig,
    TuneFusionConfig,
)
from umarvel.data.io import InputError, check_writable
from umarvel.errors import UserError, os_error_message
from umarvel.pipeline.stages import POOL_SETTINGS


def _answer_user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """The error boundary: a `UserError` (bad input, a bad setting, an output that cannot be written)
    or an operating-system error about a user's path is printed as `what: what is wrong` and exits 2;
    anything else is a bug and keeps its traceback."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as error:
            _fail(error)
        except OSError as error:
            message = os_error_message(error)
            if message is None:
                raise
            _fail(message)

    return run


class _App(typer.Typer):
    """A Typer app whose commands all run inside `_answer_user_errors`."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        register = super().command(*args, **kwargs)

        def decorator(function: Callable[..., Any]) -> Callable[..., Any]:
            register(_answer_user_errors(function))
            return function

        return decorator


app = _App(
    add_completion=False,
    no_args_is_help=True,
    help="Universal multimodal retrieval with multimodal LLMs (the U-MARVEL recipe).",
)
# Messages are printed verbatim (no Rich markup: a path may hold square brackets) and never wrapped, so
# `file:line` stays on one line in a log or a pipe.
console = Console(stderr=True, markup=False, soft_wrap=True)  # messages and errors
stdout = Console(markup=False)  # results: tables, the quickstart's report
T = TypeVar("T")
# The small real datasets live beside the project checkout (../shared/data from the repo root).
DEFAULT_SHARED_DATA = Path(os.environ.get("UMARVEL_SHARED_DATA", "../shared/data"))


class _MainProcessFilter(logging.Filter):
    """Keep log records from the main process only (under torchrun / accelerate launch)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from umarvel.distributed import world

        return world().main


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    # A terminal gets Rich's columns; a log file or a pipe gets one plain line a record, never wrapped.
    handler: logging.Handler
    if console.is_terminal:
        handler = RichHandler(console=console, show_path=False, markup=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    handler.addFilter(_MainProcessFilter())
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", handlers=[handler], force=True
    )
    for noisy in ("transformers", "httpx", "urllib3", "timm", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from umarvel.distributed import world

    # Under torchrun / accelerate launch every rank runs the command and only rank 0 speaks (an error
    # raised on every rank is printed once).
    console.quiet = stdout.quiet = not world().main


def _fail(error: Exception | str) -> NoReturn:
    console.print(Text.assemble(("error: ", "bold red"), str(error)))
    raise typer.Exit(code=2)


def _config(cls: type[T], **options: Any) -> T:
    """The command's typed config from its options (Paths as strings, repeated options as tuples,
    absent ones left at the class defaults); a bad value fails naming the option, before any work."""
    values = {}
    for name, value in options.items():
        if isinstance(value, list):
            value = tuple(str(v) if isinstance(v, Path) else v for v in value)
        elif isinstance(value, Path):
            value = str(value)
        if value is not None:
            values[name] = value
    try:
        return from_dict(cls, values)
    except ConfigError as error:
        _fail(error)
    raise AssertionError  # unreachable: _fail exits


def _embedder_config(model: str, overrides: list[str] | None) -> EmbedderConfig:
    from umarvel.modeling.embedder import resolve_config

    return resolve_config(model, overrides or ())


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
    check_writable(output)
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

    check_writable(output_dir, folder=True)
    run_demo(shared_data, output_dir, _embedder_config(model, set_), photos=photos, console=stdout)


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

    config = load_config(recipe, overrides or [])
    if dry_run:
        summary = run_dry(config, dry_run_dir / recipe.stem, family=family)
        console.print(
            f"dry run of {recipe}: {summary['steps']} steps with {summary['model']} -> "
            f"{summary['output_dir']}"
        )
        for path in summary["stand_ins"]:
            console.print(f"warning: {path} does not exist; the dry run used a stand-in (a real run fails)")
        return
    check_writable(config.output_dir, folder=True)
    model_dir = train_stage(config)
    console.print(f"stage {config.stage} done: {model_dir}")


@app.command()
def index(
    model: Annotated[str, typer.Option(help="offline | tiny:<family> | hub id | checkpoint folder")],
    pool: Annotated[Path, typer.Option(help="candidates JSONL (did, txt, img_path)")],
    out: Annotated[Path, typer.Option(help="index folder to write")],
    factory: Annotated[
        str,
        typer.Option(
            help="FAISS factory: Flat (exact), SQ8 (int8), Binary (1 bit), IVF1024,Flat, HNSW32, ..."
        ),
    ] = IndexConfig.factory,
    rescore: Annotated[
        int, typer.Option(help="keep float vectors; rank RESCORE x k candidates of a compact index exactly")
    ] = IndexConfig.rescore,
    image_root: Annotated[Path | None, typer.Option(help="images are relative to this folder")] = None,
    cache: Annotated[Path | None, typer.Option(help="content-addressed embedding cache folder")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="embedder override key=value")] = None,
    backend: Annotated[str, typer.Option(help="faiss (in the folder) | milvus")] = IndexConfig.backend,
    uri: Annotated[
        str | None,
        typer.Option(help="milvus: a Milvus Lite file (default OUT/vectors.db) or http://host:19530"),
    ] = None,
    collection: Annotated[
        str | None, typer.Option(help="milvus: the collection (default umarvel_<OUT name>)")
    ] = None,
) -> None:
    """Embed a pool and build an index folder (FAISS, or a Milvus collection), with a manifest naming
    the embedder."""
    from umarvel.pipeline.stages import run_index

    config = _config(
        IndexConfig,
        model=model,
        settings=set_,
        pool=pool,
        out=out,
        factory=factory,
        image_root=image_root,
        cache=cache,
        backend=backend,
        uri=uri,
        collection=collection,
        rescore=rescore,
    )
    check_writable(out, folder=True)
    artifact = run_index(config)
    where = factory if config.backend == "faiss" else f"Milvus, {config.uri or out / 'vectors.db'}"
    console.print(f"indexed {artifact.extra['size']} candidates into {out} ({where})")


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

    if text is None and image is None:
        _fail(InputError(None, "give --text, --image or both"))
    overrides: dict[str, Any] = {}
    for item in set_ or []:
        apply_override(overrides, item)
    result = search_index(
        index_dir, text, image, instruction, k, overrides, reranker, rerank_top, fusion_weight
    )
    table = Table(title=f"top {k}")
    for column in ("rank", "did", "score"):
        table.add_column(column)
    for rank, (did, score) in enumerate(zip(result.ids[0], result.scores[0], strict=True), start=1):
        table.add_row(str(rank), did, f"{score:.4f}")
    stdout.print(table)


@app.command()
def mine(
    model: Annotated[str, typer.Option(help="the embedder that mines (the stage-A3 checkpoint)")],
    root: Annotated[Path, typer.Option(help="the M-BEIR folder")],
    out: Annotated[Path, typer.Option(help="output folder: negatives.jsonl, audit.json, audit_scores.png")],
    queries: Annotated[str, typer.Option(help="query file under root")] = MineConfig.queries,
    pool: Annotated[str, typer.Option(help="pool file under root")] = MineConfig.pool,
    k: Annotated[int, typer.Option(help="negatives per query")] = MineConfig.k,
    max_score: Annotated[
        float | None, typer.Option(help="drop candidates scoring above this (paper: 0.7)")
    ] = MineConfig.max_score,
    margin: Annotated[
        float | None, typer.Option(help="drop candidates above positive score - margin")
    ] = MineConfig.margin,
    relative: Annotated[
        float | None, typer.Option(help="drop candidates above this fraction of the positive's score")
    ] = MineConfig.relative,
    shortlist: Annotated[int, typer.Option(help="candidates retrieved per query")] = MineConfig.shortlist,
    selection: Annotated[
        str, typer.Option(help="top | sample (from the rank window)")
    ] = MineConfig.selection,
    rank_start: Annotated[
        int, typer.Option(help="rank window start, after filtering")
    ] = MineConfig.rank_start,
    rank_end: Annotated[int, typer.Option(help="rank window end, after filtering")] = MineConfig.rank_end,
    keep_duplicates: Annotated[
        bool, typer.Option(help="keep copies of a positive's text/image")
    ] = MineConfig.keep_duplicates,
    seed: Annotated[int, typer.Option(help="seed for sampled selection")] = MineConfig.seed,
    set_: Annotated[list[str] | None, typer.Option("--set", help="embedder override key=value")] = None,
    cache: Annotated[Path | None, typer.Option(help="content-addressed embedding cache folder")] = None,
) -> None:
    """Mine hard negatives with false-negative filtering, and write an audit of what was dropped."""
    from umarvel.pipeline.stages import run_mine

    config = _config(
        MineConfig,
        model=model,
        settings=set_,
        root=root,
        out=out,
        queries=queries,
        pool=pool,
        k=k,
        max_score=max_score,
        margin=margin,
        relative=relative,
        shortlist=shortlist,
        selection=selection,
        rank_start=rank_start,
        rank_end=rank_end,
        keep_duplicates=keep_duplicates,
        seed=seed,
        cache=cache,
    )
    check_writable(out, folder=True)
    artifact = run_mine(config)
    console.print(f"wrote {artifact.path} and {out / 'audit.json'}")


eval_app = _App(no_args_is_help=True, help="Evaluate: the M-BEIR table, or existing run files.")
app.add_typer(eval_app, name="eval")


@eval_app.command("mbeir")
def eval_mbeir(
    model: Annotated[str, typer.Option(help="offline | tiny:<family> | hub id | checkpoint folder")],
    root: Annotated[Path, typer.Option(help="the M-BEIR folder")],
    out: Annotated[Path, typer.Option(help="output folder (runs/, mbeir_results.tsv, results.json)")],
    split: Annotated[str, typer.Option(help="test | val")] = EvalConfig.split,
    pool: Annotated[str, typer.Option(help="local | global | both")] = EvalConfig.pool,
    tasks: Annotated[list[str] | None, typer.Option(help="rows to keep, e.g. mscoco_task0")] = None,
    factory: Annotated[str, typer.Option(help="FAISS factory string")] = EvalConfig.factory,
    set_: Annotated[list[str] | None, typer.Option("--set", help="embedder override key=value")] = None,
    reranker: Annotated[
        str | None, typer.Option(help="U-MARVEL+: re-rank each query's top K with this re-ranker")
    ] = None,
    rerank_top: Annotated[int, typer.Option(help="candidates re-ranked per query")] = EvalConfig.rerank_top,
    fusion_weight: Annotated[
        float | None,
        typer.Option(help="w in cos + w * P(Yes); default: the re-ranker's tuned weight, else 0.1"),
    ] = None,
) -> None:
    """Embed queries once, search local and global pools, write UniIR run files and the results.

    With --reranker, also re-rank (U-MARVEL+) into OUT/rerank/ and print both tables."""
    from umarvel.evaluation.mbeir import render_table
    from umarvel.pipeline.stages import run_eval

    config = _config(
        EvalConfig,
        model=model,
        settings=set_,
        root=root,
        out=out,
        split=split,
        pool=pool,
        tasks=tasks,
        factory=factory,
        reranker=reranker,
        rerank_top=rerank_top,
        fusion_weight=fusion_weight,
    )
    check_writable(out, folder=True)
    artifact, scores, reranked = run_eval(config)
    stdout.print(render_table(scores))
    if reranked is not None:
        stdout.print(f"U-MARVEL+ (top {rerank_top} re-ranked, cos + {artifact.extra['weight']} * P(Yes)):")
        stdout.print(render_table(reranked))


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

    check_writable(out, folder=True)
    config = _embedder_config(model, set_)
    results = evaluate_zeroshot(Embedder.from_config(config), suite, root)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    (out / "results.md").write_text(render_zeroshot(results) + "\n")
    write_manifest(
        out, "eval zeroshot", config, inputs={"root": root}, extra={"suite": suite, "results": results}
    )
    stdout.print(render_zeroshot(results))


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
    check_writable(out.with_suffix(".md"))
    markdown, table = compare_results(pairs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown + "\n")
    write_json(out.with_suffix(".json"), table)
    plot_comparison(table, out.with_suffix(".png"))
    stdout.print(markdown)


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

    if pool not in POOL_SETTINGS:
        _fail(ConfigError(f"--pool must be one of {', '.join(POOL_SETTINGS)}, got {pool!r}"))
    check_writable(out, folder=True)
    scores = score_runs(root, runs, split, settings=POOL_SETTINGS[pool])
    write_results(scores, out, split)
    write_manifest(
        out, "eval runs", {"split": split, "pool": pool}, inputs={"mbeir_root": root, "runs": runs}
    )
    stdout.print(render_table(scores))


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

    check_writable(out, folder=True)
    config = _embedder_config(model, set_)
    embedder = Embedder.from_config(config)
    result = evaluate(embedder)
    write_json(out / "results.json", result)
    write_manifest(out, f"eval {name}", config, inputs=inputs, extra={"results": result})
    table = Table(title=f"{name}: {model}")
    table.add_column("metric")
    table.add_column("value")
    for key, value in result.items():
        table.add_row(key, str(value))
    stdout.print(table)


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

    check_writable(output_dir, folder=True)
    run_quickstart(output_dir, "smoke" if smoke else "full", console=stdout)


@app.command()
def serve(
    index_dir: Annotated[Path, typer.Argument(help="an index folder written by `umarvel index`")],
    reranker: Annotated[str | None, typer.Option(help="a re-ranker for rerank=true requests")] = None,
    host: Annotated[str, typer.Option(help="interface to listen on")] = ServeConfig.host,
    port: Annotated[int, typer.Option(help="port")] = ServeConfig.port,
    max_k: Annotated[int, typer.Option(help="largest k a request may ask for")] = ServeConfig.max_k,
    max_image_mb: Annotated[
        float, typer.Option(help="largest uploaded image, MB")
    ] = ServeConfig.max_image_mb,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="runtime override, e.g. dtype=bfloat16 (not the model)")
    ] = None,
    api_key_file: Annotated[
        Path | None, typer.Option(help="API keys, one per line; also $UMARVEL_API_KEYS (comma-separated)")
    ] = None,
    cors_origin: Annotated[
        list[str] | None, typer.Option(help="an origin allowed to call from a browser; repeatable")
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="the model id of /v1 (default: the embedder's model)")
    ] = None,
    max_batch: Annotated[
        int, typer.Option(help="dynamic batching: most items per model call (0: each request alone)")
    ] = ServeConfig.max_batch,
    max_wait_ms: Annotated[
        float, typer.Option(help="dynamic batching: how long a batch waits for more requests")
    ] = ServeConfig.max_wait_ms,
) -> None:
    """Serve an index over HTTP: a search page at /, POST /search and /embed, the OpenAI-compatible
    /v1/embeddings, /v1/models and /v1/rerank, /health, /metrics, and the OpenAPI schema at /docs."""
    import uvicorn

    from umarvel.config.stages import check_settings
    from umarvel.serve.app import ServeLimits, Service, create_app, read_api_keys
    from umarvel.serve.batching import Batching

    config = _config(
        ServeConfig,
        index=index_dir,
        reranker=reranker,
        host=host,
        port=port,
        max_k=max_k,
        max_image_mb=max_image_mb,
        settings=set_,
        api_key_file=api_key_file,
        cors_origins=cors_origin,
        served_model_name=served_model_name,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
    )
    keys = read_api_keys(config.api_key_file)
    batching = Batching(config.max_batch, config.max_wait_ms) if config.max_batch else None
    limits = ServeLimits(max_k=config.max_k, max_image_bytes=int(config.max_image_mb * 1024 * 1024))
    service = Service(
        config.index,
        config.reranker,
        check_settings(config.settings),
        limits,
        config.served_model_name,
        batching,
    )
    access = f"{len(keys)} API key(s) required" if keys else "no API key required"
    console.print(
        f"serving {index_dir} ({service.index.size} candidates) on http://{host}:{port}/ ({access})"
    )
    app_ = create_app(service, keys, config.cors_origins)
    uvicorn.run(app_, host=config.host, port=config.port, log_level="info")


@app.command("train-reranker")
def train_reranker_command(
    recipe: Annotated[Path, typer.Argument(help="re-ranker recipe (YAML)")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides")] = None,
) -> None:
    """Train the pointwise Yes/No re-ranker (resumes from its newest checkpoint when rerun)."""
    from umarvel.config.schema import RerankerRunConfig
    from umarvel.pipeline.train import train_reranker

    config = load_config(recipe, overrides or [], RerankerRunConfig)
    check_writable(config.output_dir, folder=True)
    model_dir = train_reranker(config)
    console.print(f"re-ranker {config.stage} done: {model_dir}")


@app.command()
def score(
    model: Annotated[str, typer.Option(help="the stage-B embedder (shortlists)")],
    reranker: Annotated[str, typer.Option(help="the re-ranker (R1) that scores the shortlists")],
    root: Annotated[Path, typer.Option(help="the M-BEIR folder")],
    out: Annotated[Path, typer.Option(help="output folder: teacher.jsonl, summary.json, parts/")],
    queries: Annotated[str, typer.Option(help="query file under root")] = ScoreConfig.queries,
    pool: Annotated[
        str, typer.Option(help="training pool under root; local pools are cut from it")
    ] = ScoreConfig.pool,
    fraction: Annotated[
        float, typer.Option(help="share of each task's queries to score")
    ] = ScoreConfig.fraction,
    top: Annotated[int, typer.Option(help="shortlist size K per query")] = ScoreConfig.top,
    alpha: Annotated[
        float, typer.Option(help="teacher = alpha * cos + (1 - alpha) * P(Yes)")
    ] = ScoreConfig.alpha,
    alpha_task: Annotated[
        list[str] | None, typer.Option(help="per-task alpha, TASK=ALPHA (e.g. 0=0.75); repeatable")
    ] = None,
    alpha_grid: Annotated[
        list[float] | None,
        typer.Option(
            help="choose each task's alpha from these values by the MRR of its labelled positives; repeatable"
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="sampling seed")] = ScoreConfig.seed,
    set_: Annotated[list[str] | None, typer.Option("--set", help="embedder override key=value")] = None,
) -> None:
    """Score a stratified sample of training queries' shortlists with the re-ranker: the distillation
    teacher (resumable)."""
    from umarvel.pipeline.stages import run_score

    config = _config(
        ScoreConfig,
        model=model,
        reranker=reranker,
        settings=set_,
        root=root,
        out=out,
        queries=queries,
        pool=pool,
        fraction=fraction,
        top=top,
        alpha=alpha,
        alpha_task=alpha_task,
        alpha_grid=alpha_grid,
        seed=seed,
    )
    check_writable(out, folder=True)
    artifact = run_score(config)
    console.print(f"wrote {artifact.path}")


@app.command("tune-fusion")
def tune_fusion_command(
    model: Annotated[str, typer.Option(help="the retriever")],
    reranker: Annotated[str, typer.Option(help="the re-ranker folder; the chosen weight is stored in it")],
    root: Annotated[Path, typer.Option(help="the M-BEIR folder")],
    out: Annotated[Path, typer.Option(help="output folder (retrieval runs, re-ranked runs, fusion.json)")],
    split: Annotated[str, typer.Option(help="a validation split (never test)")] = TuneFusionConfig.split,
    rerank_top: Annotated[
        int, typer.Option(help="candidates re-ranked per query")
    ] = TuneFusionConfig.rerank_top,
    grid: Annotated[list[float] | None, typer.Option(help="weights to try; repeatable")] = None,
    pool: Annotated[str, typer.Option(help="local | global | both")] = TuneFusionConfig.pool,
    significant_only: Annotated[
        bool, typer.Option(help="keep w = 0 unless the best w's gain has a 95% interval above 0")
    ] = TuneFusionConfig.significant_only,
    set_: Annotated[list[str] | None, typer.Option("--set", help="embedder override key=value")] = None,
) -> None:
    """Pick the U-MARVEL+ fusion weight w (cos + w * P(Yes)) on a validation split and store it with
    the re-ranker."""
    from umarvel.pipeline.stages import run_tune_fusion

    if split == "test":
        _fail(ConfigError("tune-fusion refuses the test split: tune on val, report on test"))
    config = _config(
        TuneFusionConfig,
        model=model,
        reranker=reranker,
        settings=set_,
        root=root,
        out=out,
        split=split,
        rerank_top=rerank_top,
        grid=grid,
        pool=pool,
        significant_only=significant_only,
    )
    check_writable(out, folder=True)
    artifact = run_tune_fusion(config)
    table = Table(title=f"fusion weight on {split} (mean of local and global averages)")
    table.add_column("w")
    table.add_column("score")
    for weight, value in artifact.extra["by_weight"].items():
        table.add_row(weight + (" *" if float(weight) == artifact.extra["weight"] else ""), f"{value:.2f}")
    stdout.print(table)
    gain = artifact.extra["gain_over_weight_0"]
    if gain is not None:
        low, high = gain["interval"]
        stdout.print(
            f"w = {artifact.extra['best']} vs w = 0: {gain['difference']:+.2f} [{low:+.1f}, {high:+.1f}]"
        )


@app.command()
def pipeline(
    recipe: Annotated[Path, typer.Argument(help="multi-stage recipe (YAML: stages, output_dir, seed)")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides")] = None,
    from_: Annotated[str | None, typer.Option("--from", help="first stage to run")] = None,
    until: Annotated[str | None, typer.Option(help="last stage to run")] = None,
) -> None:
    """Run a multi-stage recipe: unchanged finished stages are skipped, changed ones rerun fresh (their
    old folder kept aside), half-done ones resume."""
    from umarvel.pipeline.run import run_pipeline

    config = load_config(recipe, overrides or [], cls=PipelineConfig)
    check_writable(config.output_dir, folder=True)
    status = run_pipeline(config, from_, until)
    for name, state in status.items():
        console.print(f"{name}: {state}")


export_app = _App(no_args_is_help=True, help="Export the embedder to other runtimes.")
app.add_typer(export_app, name="export")


@export_app.command("onnx")
def export_onnx_command(
    model: Annotated[str, typer.Argument(help="offline, tiny:composed or a composed checkpoint folder")],
    out: Annotated[Path, typer.Argument(help="folder for text.onnx, image.onnx and the processor")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="embedder override key=value")] = None,
) -> None:
    """Export the embedder's text and image paths to ONNX (float32; run them with onnxruntime through
    `umarvel.modeling.export.OnnxEmbedder`)."""
    from umarvel.modeling.export import export_onnx

    check_writable(out, folder=True)
    record = export_onnx(model, out, set_ or ())
    console.print(
        f"wrote {out}/text.onnx and {out}/image.onnx (dim {record['dim']}, {record['export_seconds']} s)"
    )


@app.command("make-mini-mbeir")
def make_mini_mbeir(
    output: Annotated[Path, typer.Argument(help="folder to create (the M-BEIR root)")],
) -> None:
    """Write the deterministic mini M-BEIR test fixture (all 16 rows, tiny images)."""
    from umarvel.config.manifest import write_manifest
    from umarvel.testing.mbeir import build_mini_mbeir

    check_writable(output, folder=True)
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

    check_writable(output, folder=True)
    root = build_benchmark(shared_data, output, seed=seed, max_queries=max_queries)
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
    stdout.print(table)


def main() -> None:
    """The console entry (`umarvel`, `python -m umarvel`). A process of a multi-process launch leaves
    through `distributed.leave`, which keeps a teardown abort from failing a finished rank."""
    from umarvel.distributed import leave

    try:
        app(sys.argv[1:])
    except SystemExit as stop:
        code = stop.code
    else:
        code = None
    leave(code)


if __name__ == "__main__":  # `python -m umarvel.cli ...`, as launchers such as `accelerate launch -m` run it
    main()
