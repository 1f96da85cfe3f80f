"""Self-improvement: the student learns from its own verified answers (METHODS.md, "self-knowledge").

Rejection-sampling fine-tuning (RFT, Yuan et al. 2023) / STaR without rationalisation (Zelikman et
al. 2022) on the one loop, in rounds of ``method.steps_per_round`` optimizer steps. In a round, each
prompt the loop's batches bring is answered ``method.n_samples`` times by the student (sampled, once
per prompt and round: the first time the round meets it), a verifier (:mod:`lmdistill.methods.verify`)
keeps the good answers, and the step trains cross-entropy on the accepted (prompt, answer) sequences:
a data row becomes its prompt's accepted answers (none when all were rejected). At the next round the
improved student answers afresh. ``steps_per_round: 1`` samples every step (online RFT).

Compute is counted by the loop's meter: sampling (prefill + one position per row and decoding step)
as 2·N per token, training on the accepted sequences as 6·N per token. A checkpoint keeps the round's
answers and counts, so a resumed run trains on the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from accelerate.utils import gather_object

from lmdistill.config import MethodConfig
from lmdistill.data.tokenize import IGNORE_INDEX
from lmdistill.generation import sample_ids
from lmdistill.methods.base import Batch, Loss, register
from lmdistill.methods.common import batch_prompts, training_layout
from lmdistill.methods.sft import SFT
from lmdistill.methods.verify import VERIFIERS, Sample
from lmdistill.teachers import Needs


@dataclass
class SelfImproveConfig(MethodConfig):
    """Self-improvement (RFT / STaR): SFT on the student's own samples that a verifier accepts, in rounds."""

    n_samples: int = 4
    """Answers the student samples per prompt and round (N)."""
    steps_per_round: int = 50
    """Optimizer steps per round; a round samples each of its prompts once, with the student as it is when the
    round first meets the prompt (1: every step samples afresh, online)."""
    verifier: str = "answer"
    """Which samples are kept: `answer` (math: the exact final answer; cut samples rejected), or a verifier
    registered with `lmdistill.methods.verify.register_verifier` (a judge)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_new_tokens: int = 32
    """Length limit of a sample."""
    judge_threshold: float = 7.0
    """`verifier=judge`: the least score (1–10) of the teacher's for a sample to be kept."""
    unique: bool = True
    """Train each distinct accepted answer of a prompt once (RFT's distinct paths); false: every accepted sample
    (an easy prompt, answered right N times, weighs N times)."""

    def __post_init__(self) -> None:
        for key in ("n_samples", "steps_per_round", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"method.{key} must be >= 1, got {getattr(self, key)}")
        if not self.temperature > 0:
            raise ValueError(f"method.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"method.top_p must be in (0, 1], got {self.top_p}")
        if not 1 <= self.judge_threshold <= 10:
            raise ValueError(f"method.judge_threshold must be in [1, 10] (the judge's scale), got {self.judge_threshold}")
        if self.verifier not in VERIFIERS:
            raise ValueError(f"method.verifier: unknown {self.verifier!r}; known: {', '.join(sorted(VERIFIERS))}")


@dataclass
class Round:
    """One round's samples on this process: the accepted answers per prompt (token ids) and the counts."""

    index: int
    accepted: dict[tuple[int, ...], list[list[int]]] = field(default_factory=dict)
    """Prompt → its accepted answers (empty: all rejected); every prompt sampled this round is a key."""
    drawn: int = 0
    """Samples drawn."""
    kept: int = 0
    """Samples the verifier accepted (before `unique`)."""
    prompts: int = 0
    """Prompts sampled."""
    solved: int = 0
    """Prompts with at least one accepted sample."""

    def state(self) -> dict:
        """The round as JSON numbers and flat int64 tensors, for a checkpoint."""
        prompts = list(self.accepted)
        answers = [a for p in prompts for a in self.accepted[p]]

        def flat(seqs: list) -> torch.Tensor:
            return torch.tensor([i for s in seqs for i in s], dtype=torch.int64)

        def lengths(seqs: list) -> torch.Tensor:
            return torch.tensor([len(s) for s in seqs], dtype=torch.int64)

        return {"index": self.index, "drawn": self.drawn, "kept": self.kept, "prompts": self.prompts,
                "solved": self.solved, "prompt_ids": flat(prompts), "prompt_lengths": lengths(prompts),
                "answers_per_prompt": torch.tensor([len(self.accepted[p]) for p in prompts], dtype=torch.int64),
                "answers": flat(answers), "answer_lengths": lengths(answers)}

    @classmethod
    def from_state(cls, state: dict) -> Round:
        prompts = [tuple(p.tolist()) for p in torch.split(state["prompt_ids"], state["prompt_lengths"].tolist())]
        answers = [a.tolist() for a in torch.split(state["answers"], state["answer_lengths"].tolist())]
        accepted, at = {}, 0
        for p, n in zip(prompts, state["answers_per_prompt"].tolist()):
            accepted[p], at = answers[at : at + n], at + n
        return cls(state["index"], accepted, state["drawn"], state["kept"], state["prompts"], state["solved"])


@register
class SelfImprove(SFT):
    """Self-improvement on the one loop: each round the student's verified samples are its training data.

    Logged per step: `accept_rate` (accepted / drawn samples of the round so far: at a round's last step,
    the round's), `solve_rate` (prompts with an accepted sample / prompts sampled, the round so far) and
    `round` (0-based), besides `ce` on the accepted sequences.
    """

    name = "self-improve"
    config_class = SelfImproveConfig

    @classmethod
    def teacher_needs(cls, cfg: SelfImproveConfig) -> Needs:
        return VERIFIERS[cfg.verifier].needs

    def __init__(self, cfg: SelfImproveConfig, ctx) -> None:
        super().__init__(cfg, ctx)
        self.verifier = VERIFIERS[cfg.verifier].make(cfg, ctx)
        self._round = Round(-1)

    def sequences(self, batch: Batch) -> Batch:
        index = self.ctx.step // self.cfg.steps_per_round
        if index != self._round.index:
            self._round = Round(index)
        prompts = [tuple(p) for p in batch_prompts(batch)]
        new = [p for p in dict.fromkeys(prompts) if p not in self._round.accepted]
        if new:
            references = {}
            for p, labels in zip(prompts, batch["labels"]):
                references.setdefault(p, labels[labels != IGNORE_INDEX].tolist())
            self._answer(new, [references[p] for p in new])
        rows = [(list(p), a) for p in prompts for a in self._round.accepted[p]]
        tok = self.ctx.tokenizer
        if not rows:
            # Nothing accepted: one token, nothing trained (the loop still runs its forward and backward).
            one = batch["input_ids"][:1, :1]
            return {"input_ids": one, "attention_mask": torch.ones_like(one),
                    "labels": torch.full_like(one, IGNORE_INDEX)}
        return training_layout([p for p, _ in rows], [a for _, a in rows], tok.pad_token_id, batch["input_ids"].device)

    def _answer(self, prompts: list[tuple[int, ...]], references: list[list[int]]) -> None:
        """Sample N answers to each prompt, verify them, and add the accepted ones to the round."""
        cfg, tok, n = self.cfg, self.ctx.tokenizer, self.cfg.n_samples
        asked = [list(p) for p in prompts for _ in range(n)]
        answers = sample_ids(self.ctx.accelerator.unwrap_model(self.ctx.model), asked, pad_id=tok.pad_token_id,
                             eos_id=tok.eos_token_id, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             top_p=cfg.top_p)
        texts = {k: tok.decode(list(k), skip_special_tokens=True) for k in prompts}
        refs = [tok.decode(r, skip_special_tokens=True) for r in references]
        samples = [Sample(texts[prompts[i // n]], tok.decode(a, skip_special_tokens=True), refs[i // n],
                          a[-1] == tok.eos_token_id) for i, a in enumerate(answers)]
        ok = self.verifier.accept(samples)
        if len(ok) != len(samples):
            raise ValueError(f"verifier {cfg.verifier!r} returned {len(ok)} verdicts for {len(samples)} samples")
        r = self._round
        for j, p in enumerate(prompts):
            kept = [a for a, good in zip(answers[j * n : (j + 1) * n], ok[j * n : (j + 1) * n]) if good]
            r.kept += len(kept)
            r.solved += bool(kept)
            r.accepted[p] = [list(a) for a in dict.fromkeys(map(tuple, kept))] if cfg.unique else kept
        r.drawn += len(samples)
        r.prompts += len(prompts)

    def loss(self, model, batch: Batch) -> Loss:
        terms, _ = super().loss(model, batch)
        r = self._round
        # The round's counts so far, the same in every micro-batch of the step: the loop's Σ / Σ over
        # micro-batches and processes is the round's rate over all processes.
        return terms, {"accept_rate": (float(r.kept), float(r.drawn)),
                       "solve_rate": (float(r.solved), float(r.prompts)), "round": (float(r.index), 1.0)}

    def state_dict(self) -> dict:
        mine = self._round.state()
        # Each process samples its own prompts: keep every process's round, each restores its own.
        return {"processes": gather_object([mine]) if self.ctx.accelerator.num_processes > 1 else [mine]}

    def load_state_dict(self, state: dict) -> None:
        rounds = [Round.from_state(s) for s in state["processes"]]
        acc = self.ctx.accelerator
        if len(rounds) == acc.num_processes:
            self._round = rounds[acc.process_index]
            return
        # Another process layout: every process takes all the answers, the counts stay on the first one.
        merged = Round(rounds[0].index)
        for r in rounds:
            merged.accepted.update(r.accepted)
            if acc.is_main_process:
                for key in ("drawn", "kept", "prompts", "solved"):
                    setattr(merged, key, getattr(merged, key) + getattr(r, key))
        self._round = merged
