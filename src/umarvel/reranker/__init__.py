"""The MLLM re-ranker (method section 6) and everything that is only about it, with the retriever's
file roles:

- `model`: `Reranker`, P(Yes) of a (query, candidate) pair in one forward pass;
- `data`: pairs, their rendering as one chat turn, and the training rows (one positive, one negative);
- `training`: the `Trainer` with the answer-token cross-entropy (the stage driver is
  `pipeline/train.py`, beside the embedder's);
- `scoring`: U-MARVEL+, the retriever's top K re-scored cos + w * P(Yes), for run files and single
  queries, and the fusion weight tuned on val;
- `teacher`: re-ranker scores over the stage-B embedder's shortlists, the distillation target of stage C.
"""
