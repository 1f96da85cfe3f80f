"""SFT: the data's responses, cross-entropy on response tokens."""

from __future__ import annotations

from lmdistill.losses import response_ce_sum
from lmdistill.methods.base import Batch, Loss, Method, Term, register


@register
class SFT(Method):
    """Supervised fine-tuning on the data's responses."""

    name = "sft"

    def loss(self, model, batch: Batch) -> Loss:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return {"ce": Term(response_ce_sum(logits, batch["labels"]))}, {}
