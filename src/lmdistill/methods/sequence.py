"""Sequence-level methods: SeqKD, distilling step-by-step, context distillation (METHODS.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmdistill.config import MethodConfig
from lmdistill.data.rows import DataError
from lmdistill.losses import LOSSES, TopK, prediction_mask, response_ce_sum
from lmdistill.methods.base import Batch, Loss, Method, Term, missing_field, register
from lmdistill.methods.common import (outputs_from_state, outputs_state, student_logits, teacher_outputs, teacher_signal,
                                     trained)
from lmdistill.methods.distill import divergence_params
from lmdistill.methods.sft import SFT
from lmdistill.teachers import Capability, Needs


@dataclass
class SeqKDConfig(MethodConfig):
    """SeqKD (Kim & Rush 2016): cross-entropy on the teacher's outputs instead of the human responses."""

    source: str = "teacher"
    """`teacher`: the local teacher's greedy output for each prompt, generated during training (once per
    prompt); `data`: the rows' responses are already the teacher's (`lmdistill elicit label`)."""
    max_new_tokens: int = 64
    """Length limit of the teacher's outputs (source=teacher)."""

    def __post_init__(self) -> None:
        if self.source not in ("teacher", "data"):
            raise ValueError(f"method.source must be teacher or data, got {self.source!r}")


@register
class SeqKD(SFT):
    """Sequence-level KD: SFT on teacher-generated responses."""

    name = "seqkd"
    config_class = SeqKDConfig

    @classmethod
    def teacher_needs(cls, cfg: SeqKDConfig) -> Needs:
        if cfg.source == "data":
            return Needs()
        return Needs(Capability.TEXT, weights="method.source=teacher generates with a local teacher; for a served "
                     "teacher, label the prompts with `lmdistill elicit label` and set method.source=data",
                     generates=True, vocabulary="any")  # text: a teacher with another tokenizer generates in its own tokens

    def __init__(self, cfg: SeqKDConfig, ctx) -> None:
        super().__init__(cfg, ctx)
        self._outputs: dict[tuple[int, ...], list[int]] = {}

    @classmethod
    def prepare_rows(cls, cfg: SeqKDConfig, rows: list[dict], split: str) -> list[dict]:
        if cfg.source == "data" and split == "train":
            unlabelled = [r for r in rows if not (r.get("provenance") or {}).get("teacher")]
            if unlabelled:
                where = unlabelled[0].get("_where", unlabelled[0].get("id", "?"))
                raise DataError(
                    f"{where}: method seqkd with method.source=data trains on teacher-labelled rows (field 'provenance.teacher', "
                    "written by `lmdistill elicit label`); this row has none"
                )
        return rows

    def state_dict(self) -> dict:
        return {"teacher_outputs": outputs_state(self.ctx, self._outputs)} if self.cfg.source == "teacher" else {}

    def load_state_dict(self, state: dict) -> None:
        if "teacher_outputs" in state:
            self._outputs = outputs_from_state(state["teacher_outputs"])

    def sequences(self, batch: Batch) -> Batch:
        if self.cfg.source == "data":
            return batch
        return teacher_outputs(self.ctx, batch, self._outputs, self.cfg.max_new_tokens)


LABEL_PREFIX, RATIONALE_PREFIX = "[label] ", "[rationale] "


@register
class StepByStep(SFT):
    """Distilling step-by-step (Hsieh et al. 2023): multitask label + rationale, label-only inference.

    Every training row with a `rationale` (from `lmdistill elicit rationales`) becomes two examples:
    "[label] prompt" → response and "[rationale] prompt" → rationale, weighted equally (the paper's
    λ = 1). Evaluation rows get the label prefix only, so the student answers without a rationale.
    """

    name = "step-by-step"

    @classmethod
    def prepare_rows(cls, cfg: MethodConfig, rows: list[dict], split: str) -> list[dict]:
        label = [{**r, "prompt": LABEL_PREFIX + r["prompt"]} for r in rows]
        if split != "train":
            return label
        missing_field(rows, "rationale", method=cls.name,
                      how="produce rationales with `lmdistill elicit rationales CONFIG` and train on its output")
        rationale = [{**r, "id": f"{r.get('id', '')}#rationale", "prompt": RATIONALE_PREFIX + r["prompt"],
                      "response": r["rationale"]} for r in rows]
        return [x for pair in zip(label, rationale) for x in pair]


@dataclass
class ContextConfig(MethodConfig):
    """Context distillation: the student without the context matches the teacher given it."""

    objective: str = "divergence"
    """`ce`: cross-entropy on the rows' responses (the teacher's output with the context, from
    `lmdistill elicit context`); `divergence`: a divergence between the teacher's next-token distribution
    with the context and the student's without it, at every response position."""
    divergence: str = "fkl"
    """Divergence for objective=divergence (any of the loss library)."""
    ce_weight: float = 0.0
    """Weight of cross-entropy on the responses added to the divergence."""
    beta: float = 0.5
    """jsd's beta."""
    skew: float = 0.1
    """skl / srkl skew alpha."""
    mu: float = 0.5
    """akl's head mass."""

    def __post_init__(self) -> None:
        if self.objective not in ("ce", "divergence"):
            raise ValueError(f"method.objective must be ce or divergence, got {self.objective!r}")
        if self.divergence not in LOSSES:
            raise ValueError(f"method.divergence: unknown {self.divergence!r}; known: {', '.join(LOSSES)}")


@register
class Context(Method):
    """Context distillation (Snell et al. 2022): internalise a long prefix (instructions, few-shot demos).

    Rows carry a `context` (see `lmdistill elicit context`); the teacher sees "context\\n\\nprompt", the
    student the prompt alone, both followed by the same response tokens.
    """

    name = "context"
    config_class = ContextConfig
    needs = Needs(Capability.TOPK)

    @classmethod
    def prepare_rows(cls, cfg: ContextConfig, rows: list[dict], split: str) -> list[dict]:
        if split != "train" or cfg.objective == "ce":
            return rows
        missing_field(rows, "context", method=cls.name,
                      how="produce rows with a context by `lmdistill elicit context CONFIG`")
        return [{**r, "teacher_prompt": f"{r['context']}\n\n{r['prompt']}"} for r in rows]

    def loss(self, model, batch: Batch) -> Loss:
        window, labels = trained(batch)
        logits = student_logits(model, batch, window=window)
        ce = response_ce_sum(logits, labels)
        if self.cfg.objective == "ce":
            return {"ce": Term(ce)}, {}
        t_window, teacher_labels = trained(batch, "teacher_")
        teacher = teacher_signal(self.ctx, batch, "teacher_", t_window)
        # The same response tokens sit at different offsets in the two sequences: gather both sides'
        # predicting positions in order into one row (their counts agree row by row).
        s_mask, t_mask = prediction_mask(labels), prediction_mask(teacher_labels)
        s_sel = logits[s_mask].unsqueeze(0)  # (1, N, V)
        t_sel = (teacher[t_mask].unsqueeze(0) if isinstance(teacher, torch.Tensor)
                 else TopK(*(None if x is None else x.unsqueeze(0) for x in teacher.select(t_mask))))
        ones = torch.ones(s_sel.shape[:2], dtype=torch.bool, device=logits.device)
        cfg = self.cfg
        div = LOSSES[cfg.divergence](s_sel, t_sel, ones, reduction="sum",
                                     **divergence_params(cfg.divergence, beta=cfg.beta, skew=cfg.skew, mu=cfg.mu))
        return {cfg.divergence: Term(div), "ce": Term(ce, weight=cfg.ce_weight)}, {}
