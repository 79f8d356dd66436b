"""Property tests (hypothesis, seeded, no example database): the collator's instruction span and the
negative-selection rules, over generated inputs. The metrics are checked against trec_eval in
test_metrics.py, and the index against brute force in test_search.py."""

from __future__ import annotations

import functools

from hypothesis import given, settings
from hypothesis import strategies as st

from umarvel.data.collator import Collator, EncodeItem
from umarvel.mining.filters import NegativeRules, select_negatives
from umarvel.modeling.backbones import load_backbone

SETTINGS = settings(max_examples=60, deadline=None, database=None, derandomize=True)

words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)
sentences = st.lists(words, min_size=1, max_size=8).map(" ".join)


@functools.cache
def _collator(family: str) -> Collator:
    backbone = load_backbone(f"tiny:{family}")
    return Collator(backbone.processor, nested_images=backbone.spec.nested_images)


@SETTINGS
@given(
    instruction=sentences.map(lambda s: s[0].upper() + s[1:] + "."),
    text=sentences,
    family=st.sampled_from(["composed", "qwen2_vl", "smolvlm"]),
)
def test_the_masked_tokens_are_exactly_the_instruction_for_any_instruction_and_text(
    instruction: str, text: str, family: str
) -> None:
    collator = _collator(family)
    batch = collator([EncodeItem(text=text, instruction=instruction)])
    ids, attention = batch.inputs["input_ids"][0], batch.inputs["attention_mask"][0].bool()
    masked = attention & ~batch.pooling_mask[0]
    assert collator.tokenizer.decode(ids[masked]).strip() == instruction


shortlists = st.lists(
    st.tuples(st.integers(0, 30).map(lambda i: f"d{i}"), st.floats(-1, 1, allow_nan=False)),
    max_size=25,
    unique_by=lambda pair: pair[0],
).map(lambda pairs: sorted(pairs, key=lambda pair: -pair[1]))


@SETTINGS
@given(
    shortlist=shortlists,
    positives=st.sets(st.integers(0, 30).map(lambda i: f"d{i}"), max_size=4),
    k=st.integers(1, 6),
    max_score=st.none() | st.floats(-1, 1),
    margin=st.none() | st.floats(0, 0.5),
    relative=st.none() | st.floats(0.5, 1),
    positive_score=st.none() | st.floats(-1, 1),
    rank_start=st.integers(0, 3),
    selection=st.sampled_from(["top", "sample"]),
)
def test_selected_negatives_obey_every_rule_and_each_candidate_is_kept_or_dropped_once(
    shortlist: list[tuple[str, float]],
    positives: set[str],
    k: int,
    max_score: float | None,
    margin: float | None,
    relative: float | None,
    positive_score: float | None,
    rank_start: int,
    selection: str,
) -> None:
    rules = NegativeRules(
        k=k,
        max_score=max_score,
        margin=margin,
        relative=relative,
        rank_start=rank_start,
        selection=selection,  # type: ignore[arg-type]
    )
    chosen = select_negatives(shortlist, positives, rules, row=0, positive_score=positive_score)
    negatives = chosen.negatives
    assert len(negatives) <= k
    assert len({did for did, _ in negatives}) == len(negatives)
    for did, score in negatives:
        assert did not in positives
        assert max_score is None or score <= max_score
        if positive_score is not None:
            assert margin is None or score <= positive_score - margin
            assert relative is None or score <= relative * positive_score
    dropped = [did for pairs in chosen.dropped.values() for did, _ in pairs]
    assert len(dropped) == len(set(dropped)), "a candidate was dropped by two rules"
    assert not set(dropped) & {did for did, _ in negatives}
    assert {did for did, _ in shortlist if did in positives} <= set(dropped)
    kept = [pair for pair in shortlist if pair[0] not in set(dropped)]
    if selection == "top":  # the best k of what is left, from the window's start
        assert negatives == kept[rank_start : rank_start + k]
    else:  # k of the window, in rank order
        assert set(negatives) <= set(kept[rank_start:]) and negatives == sorted(negatives, key=kept.index)
