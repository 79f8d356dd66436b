"""InfoNCE: hand-computable cases, false-negative masking, and gathering across a faked 2-process world."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional

from umarvel.losses.contrastive import info_nce


def test_equal_scores_give_log_of_the_candidate_count() -> None:
    n, k, d = 4, 2, 8
    queries = torch.zeros(n, d)
    parts = info_nce(queries, torch.randn(n, d), 0.05, negatives=torch.randn(n, k, d))
    assert math.isclose(parts["query_to_candidate"].item(), math.log(n + n * k), rel_tol=1e-6)


def test_perfect_separation_gives_almost_zero_loss() -> None:
    eye = torch.eye(4)
    parts = info_nce(eye, eye, 0.01, symmetric=True)
    assert parts["query_to_candidate"].item() < 1e-6 and parts["candidate_to_query"].item() < 1e-6


def test_one_directional_loss_matches_cross_entropy_over_the_score_matrix() -> None:
    torch.manual_seed(0)
    q, p = functional.normalize(torch.randn(5, 6), dim=-1), functional.normalize(torch.randn(5, 6), dim=-1)
    expected = functional.cross_entropy(q @ p.T / 0.05, torch.arange(5))
    torch.testing.assert_close(info_nce(q, p, 0.05)["query_to_candidate"], expected)


def test_symmetric_loss_adds_the_transposed_direction() -> None:
    torch.manual_seed(0)
    q, p = torch.randn(5, 6), torch.randn(5, 6)
    parts = info_nce(q, p, 0.1, symmetric=True)
    torch.testing.assert_close(
        parts["candidate_to_query"], functional.cross_entropy(p @ q.T / 0.1, torch.arange(5))
    )


def test_rows_sharing_a_positive_do_not_count_it_as_a_negative() -> None:
    torch.manual_seed(0)
    q = torch.randn(3, 4)
    p = torch.randn(3, 4)
    p[1] = p[0]  # rows 0 and 1 share one candidate
    ids = torch.tensor([7, 7, 9])
    masked = info_nce(q, p, 0.1, positive_ids=ids)["query_to_candidate"]
    scores = q @ p.T / 0.1
    scores[0, 1] = scores[1, 0] = float("-inf")
    torch.testing.assert_close(masked, functional.cross_entropy(scores, torch.arange(3)))


def test_a_hard_negative_that_is_the_positive_is_masked() -> None:
    torch.manual_seed(0)
    q, p = torch.randn(2, 4), torch.randn(2, 4)
    negatives = torch.stack([p[0:1], torch.randn(1, 4)])  # (2, 1, 4): row 0's negative is its own positive
    ids = {"positive_ids": torch.tensor([1, 2]), "negative_ids": torch.tensor([[1], [5]])}
    masked = info_nce(q, p, 0.1, negatives=negatives, **ids)["query_to_candidate"]
    scores = torch.cat([q @ p.T, q @ negatives.reshape(-1, 4).T], dim=1) / 0.1  # (2, 2 + 2)
    scores[0, 2] = float("-inf")
    torch.testing.assert_close(masked, functional.cross_entropy(scores, torch.arange(2)))
    unmasked = info_nce(q, p, 0.1, negatives=negatives)["query_to_candidate"]
    assert masked.item() < unmasked.item()


def test_another_labelled_positive_of_the_query_is_masked_in_both_directions() -> None:
    # Query 0 asks for a class with photos 1 and 2; row 1's positive is photo 2, so it is no negative
    # of query 0 (and query 0 is no negative of candidate 2 in the reverse direction).
    torch.manual_seed(0)
    q, p = torch.randn(3, 4), torch.randn(3, 4)
    ids = {"positive_ids": torch.tensor([1, 2, 3]), "relevant_ids": torch.tensor([[1, 2], [2, 2], [3, 3]])}
    parts = info_nce(q, p, 0.1, symmetric=True, **ids)
    forward, reverse = q @ p.T / 0.1, p @ q.T / 0.1
    forward[0, 1] = float("-inf")
    reverse[1, 0] = float("-inf")
    torch.testing.assert_close(
        parts["query_to_candidate"], functional.cross_entropy(forward, torch.arange(3))
    )
    torch.testing.assert_close(
        parts["candidate_to_query"], functional.cross_entropy(reverse, torch.arange(3))
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    torch.manual_seed(0)
    q, p, h = torch.randn(8, 6), torch.randn(8, 6), torch.randn(8, 2, 6)
    shard = slice(rank * 4, rank * 4 + 4)
    q_local, p_local, h_local = (t[shard].clone().requires_grad_() for t in (q, p, h))
    parts = info_nce(q_local, p_local, 0.07, negatives=h_local, symmetric=True, gather=True)
    loss = sum(parts.values())
    loss.backward()
    torch.save(
        {"loss": loss.detach(), "grads": [t.grad for t in (q_local, p_local, h_local)]},
        f"{out}/rank{rank}.pt",
    )
    dist.destroy_process_group()


def test_a_faked_two_process_world_matches_one_process_holding_the_whole_batch(tmp_path: Path) -> None:
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    torch.manual_seed(0)
    q, p, h = (t.requires_grad_() for t in (torch.randn(8, 6), torch.randn(8, 6), torch.randn(8, 2, 6)))
    loss = sum(info_nce(q, p, 0.07, negatives=h, symmetric=True).values())
    loss.backward()
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["loss"], loss.detach())
        shard = slice(rank * 4, rank * 4 + 4)
        for got, full in zip(result["grads"], (q.grad, p.grad, h.grad), strict=True):
            torch.testing.assert_close(got, full[shard])


def test_matryoshka_at_the_full_width_alone_is_plain_info_nce() -> None:
    from umarvel.losses.contrastive import matryoshka_info_nce

    g = torch.Generator().manual_seed(3)
    q = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1)
    parts, each = matryoshka_info_nce(q, p, 0.05, (16,), symmetric=True)
    plain = info_nce(q, p, 0.05, symmetric=True)
    assert set(parts) == set(plain) and set(each) == {f"{name}@16" for name in plain}
    for name in plain:
        torch.testing.assert_close(parts[name], plain[name])


def test_matryoshka_averages_the_loss_of_each_renormalised_prefix() -> None:
    from umarvel.losses.contrastive import matryoshka_info_nce

    g = torch.Generator().manual_seed(4)
    q, p = torch.randn(5, 12, generator=g), torch.randn(5, 12, generator=g)
    h = torch.randn(5, 2, 12, generator=g)
    parts, _ = matryoshka_info_nce(q, p, 0.1, (4, 12), negatives=h)
    norm = torch.nn.functional.normalize
    short = info_nce(norm(q[:, :4], dim=-1), norm(p[:, :4], dim=-1), 0.1, negatives=norm(h[..., :4], dim=-1))
    full = info_nce(norm(q, dim=-1), norm(p, dim=-1), 0.1, negatives=norm(h, dim=-1))
    expected = (short["query_to_candidate"] + full["query_to_candidate"]) / 2
    torch.testing.assert_close(parts["query_to_candidate"], expected)


def test_matryoshka_dimensions_outside_the_embedding_are_refused() -> None:
    from umarvel.config.schema import TrainConfig
    from umarvel.losses.contrastive import matryoshka_info_nce

    with pytest.raises(ValueError, match="Matryoshka dimensions"):
        matryoshka_info_nce(torch.randn(2, 8), torch.randn(2, 8), 0.1, (4, 16))
    with pytest.raises(ValueError, match="matryoshka_dims"):
        TrainConfig(loss="distill", matryoshka_dims=(4,))
