"""Divergence of a model to its teacher, teacher-forced on held-out reference responses.

Forward KL is KL(teacher ‖ student), reverse KL is KL(student ‖ teacher) (``lmdistill.losses``),
at the position predicting each row's first response token (DPKD compares models there) and
over every response token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lmdistill.data.tokenize import Encoded, collate
from lmdistill.losses import TopK, fkl, prediction_mask, rkl, trained_window
from lmdistill.models import causal_logits
from lmdistill.teachers.base import Capability, Teacher

MAX_K = 64
"""Top-k asked of a teacher below `full` (fewer where it holds fewer: a cache's own k)."""


def first_response_mask(labels: Tensor) -> Tensor:
    """(B, T) bool: the position predicting each row's first response token (none for a row without one)."""
    pred = prediction_mask(labels)
    first = torch.zeros_like(pred)
    has = pred.any(dim=1)
    idx = pred.long().argmax(dim=1)
    first[has.nonzero().squeeze(1), idx[has]] = True
    return first


def divergence_sums(student_logits: Tensor, teacher: Tensor | TopK, labels: Tensor) -> dict[str, float]:
    """Summed forward / reverse KL to the teacher at response positions (all, and the first of each row).

    student_logits (B, T, V); teacher (B, T, V) logits or ``TopK``; labels (B, T) as in training.
    Returns sums and counts: fkl_all, rkl_all, n_all, fkl_first, rkl_first, n_first.
    """
    every, first = prediction_mask(labels), first_response_mask(labels)
    out = {}
    for name, mask in (("all", every), ("first", first)):
        out[f"fkl_{name}"] = float(fkl(student_logits, teacher, mask, reduction="sum"))
        out[f"rkl_{name}"] = float(rkl(student_logits, teacher, mask, reduction="sum"))
        out[f"n_{name}"] = int(mask.sum())
    return out


@torch.no_grad()
def teacher_divergences(
    model: torch.nn.Module, teacher: Teacher, examples: Sequence[Encoded], pad_id: int, *, batch_size: int = 64
) -> dict:
    """Mean forward and reverse KL to the teacher on the examples' reference responses (eval mode).

    ``fkl_first`` / ``rkl_first``: at the position predicting each row's first response token;
    ``fkl_all`` / ``rkl_all``: mean over every response token; ``n_first`` / ``n_all``: positions;
    ``support``: what the teacher gave. Full logits when the teacher gives them, else its top-64
    log-probs (a cache's own k) plus a tail bucket, or tail samples for ``fkl`` where the cache has them.
    """
    full = teacher.capability >= Capability.FULL
    k = MAX_K if teacher.k is None else min(MAX_K, teacher.k)
    support = "full"
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    for i in range(0, len(examples), batch_size):
        batch = {key: v.to(device) for key, v in collate(examples[i : i + batch_size], pad_id).items()}
        ids, am = batch["input_ids"], batch["attention_mask"]
        window = trained_window(batch["labels"])
        student = causal_logits(model, ids, am, window)  # (B, W, V)
        if full:
            signal = teacher.logits(ids, am, window)  # (B, W, V')
            # A head padded past the shared vocabulary (Qwen-style) is cut to the teacher's width.
            student = student[..., : signal.shape[-1]]
        else:
            signal = teacher.topk(ids, am, k, window)  # (B, W, k)
            support = f"top-{k} + {'tail samples' if signal.sampled else 'tail'}"
        for name, v in divergence_sums(student, signal, batch["labels"][:, window]).items():
            sums[name] = sums.get(name, 0.0) + v
    model.train(was_training)
    out: dict = {"support": support}
    for which in ("first", "all"):
        n = int(sums.get(f"n_{which}", 0))
        out[f"n_{which}"] = n
        for kind in ("fkl", "rkl"):
            out[f"{kind}_{which}"] = sums[f"{kind}_{which}"] / n if n else math.nan
    return out
