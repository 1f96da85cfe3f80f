"""SFT: the data's responses, cross-entropy on response tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmdistill.data.tokenize import IGNORE_INDEX, response_token_count
from lmdistill.methods.base import Batch, Method, register


def response_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over trained tokens. logits (B, T, V), labels (B, T); position t predicts t+1."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


@register
class SFT(Method):
    """Supervised fine-tuning on the data's responses."""

    name = "sft"

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, tuple[float, float]]]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ce = response_ce_sum(logits, batch["labels"])
        return ce, {"ce": (ce.item(), float(response_token_count(batch["labels"])))}
