"""DistiLLM (Ko et al. 2024): skew KL / skew reverse KL with the adaptive off-policy replay buffer.

Each step trains on one of three sources:

- **fresh**: the student's own samples for the step's prompts (``sample_responses``), which are
  also pushed into a replay buffer of student-generated sequences (oldest dropped first);
- **replay**: sequences drawn uniformly from that buffer (off-policy reuse of earlier samples);
- **data**: the data's responses.

With probability φ a step uses student-generated sequences (fresh or replay), else data. φ
starts at ``init_prob`` and rises by ``prob_step`` (up to 1) each time the held-out cross-entropy,
measured every ``validate_every`` steps, has risen by at least ``loss_eps`` over the last value
that raised it: a student that gets worse on held-out data is shown more of its own outputs.
Among the student-sequence steps, a share ``replay_schedule`` of them sample afresh (DistiLLM's
default decreases linearly from 1 to 0 over the run), the rest replay; until the buffer is full
every student-sequence step samples afresh. This is the reference code's rule (``finetune.py``):
fresh if u < φ·share or (u < φ and the buffer is not full), replay if u < φ, else data.

The loss on every source is (1 − alpha)·CE + alpha·skl/srkl(skew) (``token_distill_loss``).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from lmdistill.data import encode_rows, load_rows
from lmdistill.data.tokenize import Encoded, collate
from lmdistill.heldout import ce_sums
from lmdistill.methods.base import Batch, Loss, Method, register
from lmdistill.methods.common import prompt_lengths, sample_responses, student_logits, teacher_signal, trained
from lmdistill.methods.distill import KDConfig, token_distill_terms
from lmdistill.teachers import Capability, Needs

SOURCES = ("data", "fresh", "replay")


@dataclass
class DistiLLMConfig(KDConfig):
    """DistiLLM: skew divergence, student samples with a probability that rises with the validation loss."""

    aligns: ClassVar[bool] = False
    divergence: str = "skl"
    """skl (skew forward KL, KL(q ‖ a·q + (1−a)·s)) or srkl (skew reverse KL); a = `skew`."""
    init_prob: float = 0.0
    """Initial probability φ that a step trains on student-generated sequences."""
    prob_step: float = 0.1
    """Added to φ (up to 1) each time the validation loss rises."""
    loss_eps: float = 0.1
    """Rise of the held-out cross-entropy (nats/token) over its last reference that counts as a rise."""
    validate_every: int = 100
    """Steps between the validations that drive φ (the first is before step 1)."""
    val_rows: int = 100
    """Held-out rows of that validation (the first ones of the run's held-out set)."""
    capacity: int = 1000
    """Replay buffer size in sequences (oldest dropped first)."""
    replay_schedule: Literal["decreasing", "constant", "increasing"] = "decreasing"
    """Share of student-sequence steps that sample afresh: 1 − step/steps, 1/2, or step/steps."""
    max_new_tokens: int = 32
    """Length limit of the student's samples."""
    sample_temperature: float = 1.0
    """Sampling temperature of the student's samples."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.divergence not in ("skl", "srkl"):
            raise ValueError(f"method.divergence must be skl or srkl for distillm, got {self.divergence!r}")
        for key in ("init_prob", "prob_step", "skew"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"method.{key} must be in [0, 1], got {getattr(self, key)}")
        if self.validate_every < 1:
            raise ValueError(f"method.validate_every must be >= 1, got {self.validate_every}")
        if self.val_rows < 1:
            raise ValueError(f"method.val_rows must be >= 1, got {self.val_rows}")
        if self.capacity < 1:
            raise ValueError(f"method.capacity must be >= 1, got {self.capacity}")


class AdaptiveOffPolicy:
    """DistiLLM's schedule: the probability φ of student-generated sequences, and each step's source."""

    def __init__(self, prob: float, prob_step: float, loss_eps: float) -> None:
        self.prob = prob
        self.prob_step = prob_step
        self.loss_eps = loss_eps
        self.reference: float | None = None
        """The validation loss that last raised φ (the first one measured, until then)."""

    def observe(self, val_loss: float) -> bool:
        """Record a validation loss; raise φ (and return True) when it is ≥ reference + loss_eps."""
        if self.reference is None:
            self.reference = val_loss
            return False
        if val_loss >= self.reference + self.loss_eps:
            self.prob = min(1.0, self.prob + self.prob_step)
            self.reference = val_loss
            return True
        return False

    def source(self, u: float, fresh_share: float, buffer_full: bool) -> str:
        """`fresh`, `replay` or `data` for a uniform draw `u` in [0, 1)."""
        if u < self.prob * fresh_share or (u < self.prob and not buffer_full):
            return "fresh"
        if u < self.prob:
            return "replay"
        return "data"

    def state_dict(self) -> dict:
        return {"prob": self.prob, "reference": self.reference}

    def load_state_dict(self, state: dict) -> None:
        self.prob, self.reference = state["prob"], state["reference"]


@register
class DistiLLM(Method):
    """Skew KL / skew reverse KL with DistiLLM's adaptive off-policy replay of student samples.

    The buffer, φ and the validation reference are kept in checkpoints, and every random draw
    comes from a generator seeded by (train.seed, step), so a resumed run continues exactly. With
    several processes each keeps its own buffer; checkpoints store process 0's, which every
    process restores.
    """

    name = "distillm"
    config_class = DistiLLMConfig
    needs = Needs(Capability.TOPK)

    def __init__(self, cfg: DistiLLMConfig, ctx) -> None:
        super().__init__(cfg, ctx)
        t = ctx.cfg.train
        per_micro = t.batch_size // (ctx.accelerator.num_processes * t.grad_accum)
        if cfg.capacity < per_micro:
            raise ValueError(f"method.capacity={cfg.capacity} must hold at least one micro-batch ({per_micro} rows)")
        self.schedule = AdaptiveOffPolicy(cfg.init_prob, cfg.prob_step, cfg.loss_eps)
        self.buffer: deque[tuple[list[int], int]] = deque(maxlen=cfg.capacity)
        """Student-generated sequences as (prompt + response ids, prompt length)."""
        self._val_set: list[Encoded] | None = None
        self._step_source: tuple[int, str, float | None] = (-1, "data", None)
        self._micro = 0

    # ------------------------------------------------------------------ the schedule

    def _validation_set(self) -> list[Encoded]:
        if self._val_set is None:
            data = self.ctx.cfg.data
            _, held = load_rows(data)
            if not held:
                raise ValueError("method distillm validates on held-out rows, but the run has none "
                                 "(set data.eval_path or data.eval_fraction > 0)")
            self._val_set = encode_rows(self.ctx.tokenizer, held[: self.cfg.val_rows], max_length=data.max_length,
                                        truncation=data.truncation, system_prompt=data.system_prompt)
        return self._val_set

    def validation_loss(self) -> float:
        """Held-out cross-entropy per response token of the current student (all processes agree)."""
        acc = self.ctx.accelerator
        share = self._validation_set()[acc.process_index :: acc.num_processes]
        total, count = ce_sums(self.ctx.model, share, self.ctx.tokenizer.pad_token_id,
                               batch_size=self.ctx.cfg.eval.batch_size, autocast=acc.autocast)
        sums = acc.reduce(torch.tensor([total, count], dtype=torch.float64, device=acc.device), "sum")
        return float(sums[0] / sums[1].clamp(min=1))

    def fresh_share(self, step: int) -> float:
        """Share of student-sequence steps that sample afresh at `step`."""
        progress = step / max(1, self.ctx.cfg.train.steps)
        return {"decreasing": 1.0 - progress, "constant": 0.5, "increasing": progress}[self.cfg.replay_schedule]

    def _rng(self, step: int, micro: int = 0) -> random.Random:
        """A generator of its own for (train.seed, step, micro-batch): draws survive a resume unchanged."""
        return random.Random((self.ctx.cfg.train.seed * 1_000_003 + step) * 1_009 + micro)

    def _source(self) -> tuple[str, float | None]:
        """This step's source (drawn on its first micro-batch) and the validation loss measured before it."""
        step = self.ctx.step
        if self._step_source[0] != step:
            val = None
            if step % self.cfg.validate_every == 0:
                val = self.validation_loss()
                self.schedule.observe(val)
            full = len(self.buffer) >= self.cfg.capacity
            source = self.schedule.source(self._rng(step).random(), self.fresh_share(step), full)
            self._step_source = (step, source, val)
            self._micro = 0
        else:
            self._micro += 1
        return self._step_source[1], self._step_source[2]

    # ------------------------------------------------------------------ sequences and loss

    def sequences(self, batch: Batch) -> Batch:
        source, val = self._source()
        device = batch["input_ids"].device
        if source == "fresh":
            out = sample_responses(self.ctx.model, batch, self.ctx, max_new_tokens=self.cfg.max_new_tokens,
                                   temperature=self.cfg.sample_temperature)
            lengths = prompt_lengths(out["labels"], out["attention_mask"])
            for ids, am, n in zip(out["input_ids"], out["attention_mask"], lengths):
                self.buffer.append((ids[: int(am.sum())].tolist(), n))
        elif source == "replay":
            rows = self._rng(self.ctx.step, self._micro + 1).sample(range(len(self.buffer)), len(batch["input_ids"]))
            examples = [Encoded(list(self.buffer[i][0]), self.buffer[i][1], "") for i in rows]
            out = {k: v.to(device) for k, v in collate(examples, self.ctx.tokenizer.pad_token_id).items()}
        else:
            out = dict(batch)
        out["distillm_source"] = torch.tensor(SOURCES.index(source), device=device)
        if val is not None:
            out["distillm_val_ce"] = torch.tensor(val, dtype=torch.float64, device=device)
        return out

    def loss(self, model, batch: Batch) -> Loss:
        window, labels = trained(batch)
        teacher = teacher_signal(self.ctx, batch, window=window)
        terms = token_distill_terms(self.cfg, student_logits(model, batch, window=window), teacher, labels)
        metrics: dict[str, tuple[float, float]] = {}
        source = SOURCES[int(batch["distillm_source"])]
        metrics["sgo_prob"] = (self.schedule.prob, 1.0)
        for s in SOURCES:
            metrics[f"source_{s}"] = (float(s == source), 1.0)
        metrics["buffer_size"] = (float(len(self.buffer)), 1.0)
        if "distillm_val_ce" in batch:
            metrics["val_ce"] = (float(batch["distillm_val_ce"]), 1.0)
        return terms, metrics

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return {"schedule": self.schedule.state_dict(), "buffer": [(list(ids), n) for ids, n in self.buffer]}

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state["schedule"])
        self.buffer.clear()
        self.buffer.extend((list(ids), int(n)) for ids, n in state["buffer"])
