"""Distances between (mapped) student hidden states and teacher hidden states (METHODS.md, `hidden`).

Per position, with x = W·h^S + b the student's hidden state mapped to the teacher's width d and
y = h^T the teacher's:

- ``mse``: mean_j (x_j − y_j)², the squared error per teacher dimension: TinyBERT's hidden-state
  loss L_hidn = MSE(H^S·W_h, H^T) (Jiao et al. 2020, §3.1, Eq. 8), and FitNets' hint loss
  ½‖u_h − r(v_g)‖² (Romero et al. 2015, Eq. 3) divided by d/2;
- ``cosine``: 1 − cos(x, y), DistilBERT's cosine embedding loss aligning the directions of the
  hidden states (Sanh et al. 2019); cos is ``F.cosine_similarity`` (its eps = 1e-8 guards a zero vector).

Each registered distance is ``fn(student (..., d), teacher (..., d)) -> (...)`` in float32 at
least; :func:`hidden_state_distance` averages one over several layer pairs and reduces it over
the masked positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import Reduction, compute_dtype, masked_reduce


def _upcast(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    if student.shape != teacher.shape:
        raise ValueError(f"student hidden states {tuple(student.shape)} and teacher's {tuple(teacher.shape)} differ")
    dtype = compute_dtype(student.dtype, teacher.dtype)
    return student.to(dtype), teacher.to(dtype)


def mse_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """mean_j (x_j − y_j)² over the last dim: (..., d), (..., d) → (...), float32 at least."""
    s, t = _upcast(student, teacher)
    return (s - t).pow(2).mean(-1)


def cosine_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """1 − cos(x, y) over the last dim: (..., d), (..., d) → (...) in [0, 2], float32 at least."""
    s, t = _upcast(student, teacher)
    return 1.0 - F.cosine_similarity(s, t, dim=-1)


HIDDEN_DISTANCES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mse": mse_distance, "cosine": cosine_distance}
"""Hidden-state distances by name, each ``fn(student (..., d), teacher (..., d)) -> (...)``."""


def hidden_state_distance(
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    mask: Tensor,
    *,
    distance: str = "mse",
    reduction: Reduction = "mean",
) -> Tensor:
    """Distance of each mapped student layer to its teacher layer, averaged over the pairs, reduced over positions.

    h_t = (1/P)·Σ_p d(student[p][:, t], teacher[p][:, t]) per position t, then ``masked_reduce``.

    Args:
        student: P tensors (B, T, d_T), the student's hidden states of the paired layers, already
            mapped to the teacher's width (one learned map per pair).
        teacher: P tensors (B, T, d_T), the teacher's hidden states of the same pairs, in order.
        mask: (B, T) bool, the positions that count.
        distance: a key of ``HIDDEN_DISTANCES``.
        reduction: "mean" over the masked positions (0 when there are none), "sum", or "none" (B, T).

    Returns:
        A scalar (mean/sum) or (B, T) ("none", masked positions 0), float32 at least.
    """
    if distance not in HIDDEN_DISTANCES:
        raise ValueError(f"unknown hidden distance {distance!r}; known: {', '.join(HIDDEN_DISTANCES)}")
    if len(student) != len(teacher) or not student:
        raise ValueError(f"need as many student as teacher layers, at least one; got {len(student)} and {len(teacher)}")
    fn = HIDDEN_DISTANCES[distance]
    per_token = torch.stack([fn(s, t) for s, t in zip(student, teacher)]).mean(0)  # (B, T)
    return masked_reduce(per_token, mask, reduction)
