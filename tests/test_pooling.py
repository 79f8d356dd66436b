"""Pooling over the explicit mask."""

from __future__ import annotations

import pytest
import torch

from umarvel.modeling.pooling import last_token_pool, mean_pool, pool


def _hidden_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 4)
    mask = torch.tensor(
        [
            [False, False, True, True, True, False],  # instruction at 0-1, padding at 5
            [True, True, True, True, True, True],
        ]
    )
    return hidden, mask


def test_mean_pooling_ignores_masked_positions() -> None:
    hidden, mask = _hidden_and_mask()
    changed = hidden.clone()
    changed[0, [0, 1, 5]] = 1000.0  # instruction and padding positions
    torch.testing.assert_close(mean_pool(hidden, mask), mean_pool(changed, mask))
    torch.testing.assert_close(mean_pool(hidden, mask)[0], hidden[0, 2:5].mean(dim=0))


def test_last_token_pooling_takes_the_last_pooled_position() -> None:
    hidden, mask = _hidden_and_mask()
    torch.testing.assert_close(last_token_pool(hidden, mask), torch.stack([hidden[0, 4], hidden[1, 5]]))


def test_pooling_refuses_a_sequence_with_nothing_to_pool() -> None:
    hidden, mask = _hidden_and_mask()
    mask[1] = False
    with pytest.raises(ValueError, match="empty pooling mask"):
        pool(hidden, mask, "mean")


def test_unknown_pooling_is_rejected() -> None:
    hidden, mask = _hidden_and_mask()
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(hidden, mask, "max")  # type: ignore[arg-type]
