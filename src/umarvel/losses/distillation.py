"""Re-ranker distillation into the embedder (method section 7.2), on embeddings and teacher scores only.

For query i and its shortlist d_i1..d_iK the student's logits are cos(q_i, d_ik) / tau with the learnable
temperature tau; the teacher's are S_ik / stopgrad(tau), where S = alpha * cos_B + (1 - alpha) * P(Yes) is
the fused score written by `umarvel score`. The loss is the forward KL(p_teacher || q_student), summed
over the shortlist and averaged over queries (`kl_div(..., reduction="batchmean")`). Local batch only:
no gather, no in-batch candidates, as in the paper's code.
"""

from __future__ import annotations

import torch
from torch.nn import functional


def distillation_kl(
    queries: torch.Tensor,
    shortlist: torch.Tensor,
    teacher: torch.Tensor,
    temperature: torch.Tensor | float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher || student) over each query's shortlist.

    Args:
        queries: (N, D) query embeddings (normalised).
        shortlist: (N, K, D) candidate embeddings, K per query.
        teacher: (N, K) fused teacher scores S (same scale as a cosine).
        temperature: scalar; the teacher uses its detached value.
        valid: optional (N, K) booleans; False entries (padding of a short shortlist) are left out of
            both distributions.

    Returns:
        The mean over queries of sum_k p_ik (log p_ik - log q_ik): 0 when the distributions agree.
    """
    student = torch.einsum("nd,nkd->nk", queries, shortlist) / temperature  # (N, K)
    tau = temperature.detach() if isinstance(temperature, torch.Tensor) else temperature
    target = teacher.to(student.dtype) / tau  # (N, K)
    if valid is not None:
        low = torch.finfo(student.dtype).min
        student = student.masked_fill(~valid, low)
        target = target.masked_fill(~valid, low)
    log_q = functional.log_softmax(student, dim=-1)
    p = functional.softmax(target, dim=-1)
    # xlogy keeps 0 * log 0 at 0 for masked entries.
    kl = torch.special.xlogy(p, p) - p * log_q
    if valid is not None:
        kl = kl.masked_fill(~valid, 0.0)
    return kl.sum(dim=-1).mean()
