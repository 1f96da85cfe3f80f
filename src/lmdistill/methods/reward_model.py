"""`reward-model`: a distilled reward model, a scalar head on the student's body trained on preference pairs.

Rows are preference pairs as `lmdistill elicit preferences` writes them (`prompt`, `chosen`, `rejected`;
the teacher's choice). The score of a response is ``r(x, y) = w · h_last``: the body's final (normed)
hidden state at the sequence's last non-pad token (:func:`lmdistill.models.last_token_index`, where
transformers' ``*ForSequenceClassification`` reads it) times a learned head ``w`` (d → 1, no bias,
zero at the start). The loss is Bradley–Terry, ``−log σ(r(x, y_w) − r(x, y_l))`` per pair
(:func:`lmdistill.losses.bradley_terry`); every evaluation logs the held-out pairwise accuracy
``eval_pair_accuracy`` (share of held-out pairs with r(y_w) > r(y_l)) and ``eval_reward_margin``.

The run's ``model/`` is a plain ``AutoModelForSequenceClassification`` directory (``num_labels=1``,
:func:`lmdistill.models.save_reward_model`), which gives the same scores without lmdistill:
``AutoModelForSequenceClassification.from_pretrained(dir)(input_ids, attention_mask).logits[:, 0]``
on right-padded rows laid out as in training (prompt rendered by the chat template, response, end of turn).
"""

from __future__ import annotations

import torch
from torch import nn

from lmdistill.config import MethodConfig
from lmdistill.data.rows import DataError
from lmdistill.data.tokenize import Encoded, collate
from lmdistill.losses import bradley_terry
from lmdistill.methods.base import ROWS, Batch, Loss, Method, Term, missing_field, register
from lmdistill.models import last_token_index, save_reward_model

HEAD = "score"
"""The head's name among the method's extra modules (and in the saved directory: ``score.weight``)."""


def hidden_size(model: nn.Module) -> int:
    """Width of a causal LM's final hidden states."""
    return int(model.config.get_text_config().hidden_size)


def sequence_rewards(model: nn.Module, head: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     pad_id: int) -> torch.Tensor:
    """(B,) scores ``head(h_last)`` of right-padded (B, T) sequences under a causal LM body and a (d → 1) head.

    The body runs with ``output_hidden_states`` and no output head (an empty ``logits_to_keep``): its
    last hidden state (after the final norm) is read at :func:`last_token_index`.
    """
    keep = torch.arange(0, device=input_ids.device)  # no position's logits: the LM head costs nothing
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=keep)
    hidden = out.hidden_states[-1]  # (B, T, d)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(input_ids, pad_id)]  # (B, d)
    return head(last).squeeze(-1)  # called as a module: a DDP-wrapped head synchronises its gradient


@register
class RewardModel(Method):
    """Bradley–Terry reward model on preference pairs (Ouyang et al. 2022 §3.5; Stiennon et al. 2020)."""

    name = "reward-model"
    supports_lora = False
    config_class = MethodConfig

    @classmethod
    def prepare_rows(cls, cfg: MethodConfig, rows: list[dict], split: str) -> list[dict]:
        """Every row (training and held-out) is a pair: `chosen` and `rejected`, different."""
        how = "train on preference pairs, e.g. the output of `lmdistill elicit preferences CONFIG`"
        missing_field(rows, "chosen", method=cls.name, how=how)
        missing_field(rows, "rejected", method=cls.name, how=how)
        for row in rows:
            if row["chosen"] == row["rejected"]:
                where = row.get("_where") or f"row {row.get('id', '?')}"
                raise DataError(f"{where}: fields 'chosen' and 'rejected' are the same response; a pair needs two")
        return [{**r, "response": r["chosen"], "ranked_responses": [r["chosen"], r["rejected"]]} for r in rows]

    def extra_modules(self, student: nn.Module) -> dict[str, nn.Module]:
        """The scalar head. The LM head is not used (nor saved): an untied one is frozen, so that neither the
        optimizer nor DDP waits for a gradient it never gets."""
        lm_head, embed = student.get_output_embeddings(), student.get_input_embeddings()
        if lm_head is not None and lm_head.weight is not embed.weight:
            lm_head.requires_grad_(False)
        head = nn.Linear(hidden_size(student), 1, bias=False)
        nn.init.zeros_(head.weight)  # every score 0 at the start: the first loss is log 2
        return {HEAD: head.to(next(student.parameters()).dtype)}

    def _rewards(self, model, batch: Batch, prefix: str) -> torch.Tensor:
        ids = batch[prefix + "input_ids"]
        rewards = sequence_rewards(model, self.ctx.modules[HEAD], ids, batch[prefix + "attention_mask"],
                                   self.ctx.tokenizer.pad_token_id)
        # The head runs outside the hooked forward: d weights at one position per row.
        per_token = (6.0 if torch.is_grad_enabled() else 2.0) * hidden_size(self.ctx.accelerator.unwrap_model(model))
        self.ctx.flops.add("train" if torch.is_grad_enabled() else "other", per_token, ids.shape[0])
        return rewards

    def loss(self, model, batch: Batch) -> Loss:
        chosen, rejected = self._rewards(model, batch, "rank0_"), self._rewards(model, batch, "rank1_")
        loss, m = bradley_terry(chosen, rejected, reduction="sum")
        pairs = float(chosen.shape[0])
        return {"bt_loss": Term(loss, ROWS)}, {k: (float(v), pairs) for k, v in m.items()}

    @torch.no_grad()
    def heldout_metrics(self, model, examples: list[Encoded]) -> dict[str, float]:
        """``eval_pair_accuracy`` (r(y_w) > r(y_l)) and ``eval_reward_margin`` (mean r(y_w) − r(y_l)) on the
        held-out pairs."""
        acc = self.ctx.accelerator
        unwrapped = acc.unwrap_model(model)
        was_training = unwrapped.training
        unwrapped.eval()
        share = examples[acc.process_index :: acc.num_processes]
        sums = torch.zeros(3, dtype=torch.float64, device=acc.device)  # correct, margin, pairs
        size = self.ctx.cfg.eval.batch_size
        try:
            for i in range(0, len(share), size):
                batch = {k: v.to(acc.device) for k, v in collate(share[i : i + size], self.ctx.tokenizer.pad_token_id).items()}
                with acc.autocast():
                    margin = (self._rewards(unwrapped, batch, "rank0_") - self._rewards(unwrapped, batch, "rank1_")).double()
                sums += torch.stack([(margin > 0).double().sum(), margin.sum(), margin.new_tensor(len(margin))])
        finally:
            unwrapped.train(was_training)
        sums = acc.reduce(sums, "sum")
        n = float(sums[2].clamp(min=1))
        return {"eval_pair_accuracy": float(sums[0]) / n, "eval_reward_margin": float(sums[1]) / n}

    def save_model(self, model, tokenizer, directory, state_dict) -> None:
        """The body and the head as a plain ``AutoModelForSequenceClassification`` directory (num_labels=1)."""
        head = self.ctx.accelerator.unwrap_model(self.ctx.modules[HEAD])
        save_reward_model(model, head.weight, tokenizer, directory, state_dict=state_dict)
