"""SFT: the data's responses, cross-entropy on response tokens."""

from __future__ import annotations

from lmdistill.losses import response_ce_sum
from lmdistill.methods.base import Batch, Loss, Method, Term, register
from lmdistill.methods.common import student_logits, trained


@register
class SFT(Method):
    """Supervised fine-tuning on the data's responses."""

    name = "sft"

    def loss(self, model, batch: Batch) -> Loss:
        window, labels = trained(batch)
        return {"ce": Term(response_ce_sum(student_logits(model, batch, window=window), labels))}, {}
