"""SFT: the data's responses, cross-entropy on response tokens."""

from __future__ import annotations

import torch

from lmdistill.data.tokenize import response_token_count
from lmdistill.losses import response_ce_sum
from lmdistill.methods.base import Batch, Method, register


@register
class SFT(Method):
    """Supervised fine-tuning on the data's responses."""

    name = "sft"

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, tuple[float, float]]]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ce = response_ce_sum(logits, batch["labels"])
        return ce, {"ce": (ce.item(), float(response_token_count(batch["labels"])))}
