"""umarvel: universal multimodal retrieval with multimodal LLMs, following the U-MARVEL recipe.

The public API, importable from the package (each name loads its module on first use, so
`import umarvel` stays light):

>>> import umarvel
>>> embedder = umarvel.Embedder.from_pretrained("tiny:composed")  # "offline", a hub id or a checkpoint
>>> queries = embedder.encode_queries(
...     [umarvel.Query("q1", text="a red dress", instruction="Find an image of the item.")], progress=False
... )
>>> pool = [umarvel.Candidate("d1", text="a red summer dress"), umarvel.Candidate("d2", text="a blue bike")]
>>> index = umarvel.Index(embedder.dim)
>>> index.add(embedder.encode_candidates(pool, progress=False), [c.did for c in pool])
>>> hits = index.search(queries, k=2)
>>> sorted(hits.ids[0])
['d1', 'd2']
>>> reranker = umarvel.Reranker.from_pretrained("tiny:composed")
>>> p_yes = reranker.score([reranker.pair(umarvel.Query("q1", text="a red dress"), pool[0])])
>>> bool(0.0 <= p_yes[0] <= 1.0)
True

- models: `Embedder` (queries and candidates -> L2-normalised vectors), `Reranker` (P(Yes) of a pair);
- records and settings: `Query`, `Candidate`, `EmbedderConfig`, `RerankerConfig`, `RunConfig`,
  `load_config` (a YAML recipe with overrides);
- retrieval: `Index` (FAISS, with the embedder's record), `encode_corpus` (resumable, sharded),
  `build_index` / `search_index` (index folders, as `umarvel index` / `search` write and read them);
- evaluation: `evaluate_mbeir` (local and global pools, UniIR run files), `score_runs`,
  `evaluate_zeroshot`, `evaluate_beir`, `evaluate_captions`;
- errors: `UserError` (something the user can fix) and its kinds `InputError` (`file:line`),
  `ConfigError` and `IndexMismatchError`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that defines it
_PUBLIC = {
    "Embedder": "umarvel.modeling.embedder",
    "Reranker": "umarvel.reranker.model",
    "Query": "umarvel.data.records",
    "Candidate": "umarvel.data.records",
    "EmbedderConfig": "umarvel.config.schema",
    "RerankerConfig": "umarvel.config.schema",
    "RunConfig": "umarvel.config.schema",
    "load_config": "umarvel.config.io",
    "Index": "umarvel.retrieval.index",
    "encode_corpus": "umarvel.retrieval.encode",
    "build_index": "umarvel.pipeline.index",
    "search_index": "umarvel.pipeline.index",
    "evaluate_mbeir": "umarvel.evaluation.mbeir",
    "score_runs": "umarvel.evaluation.mbeir",
    "evaluate_zeroshot": "umarvel.evaluation.zeroshot",
    "evaluate_beir": "umarvel.evaluation.suites",
    "evaluate_captions": "umarvel.evaluation.suites",
    "UserError": "umarvel.errors",
    "InputError": "umarvel.data.io",
    "ConfigError": "umarvel.config.io",
    "IndexMismatchError": "umarvel.retrieval.index",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'umarvel' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
