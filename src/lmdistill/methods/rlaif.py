"""`rlaif`: the student optimised against a distilled reward model by REINFORCE leave-one-out (RLOO).

Per step and prompt the student samples k responses (temperature 1: on-policy, so the estimator is
unbiased); the reward model (a `reward-model` run's ``model/``, loaded with transformers alone) scores
each; the loss is :func:`lmdistill.losses.policy.rloo_loss`:

    R = score(x, y) − missing_eos_penalty·[y has no EOS] − kl_coef·(log p_θ(y|x) − log p_ref(y|x))
    A_j = R_j − mean of the other k − 1 samples' R,   ∇L = −(1/k) Σ_j A_j ∇log p_θ(y_j|x)

with p_ref the student as it was at the start, frozen (Ahmadian et al. 2024, "Back to Basics"; the
KL-regularised objective of Ziegler et al. 2019 and Ouyang et al. 2022). Plus ``lm_weight``·CE on the
data's responses when asked.

Length handling: the reward is one number per sample, given at its end (the reward model reads the
last token); the KL penalty is the sampled log-ratio summed over the sample's tokens (not a mean, so a
longer sample pays for every token); nothing divides by the length, which keeps the estimator unbiased.
A sample cut at ``max_new_tokens`` without EOS is scored as it is, minus ``missing_eos_penalty``. A sample
that ended with EOS is scored with what the tokenizer's template puts after the end of turn appended
(:func:`lmdistill.data.tokenize.end_of_turn_suffix`), so the reward model sees it laid out as its
training rows were. The reward model must share the student's tokenizer.

Compute: the reward model and the reference are metered like every other forward (2·N per token);
the reference is a copy of the student, whose meter hook it keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmdistill.config import ConfigError, MethodConfig
from lmdistill.data.tokenize import Encoded, collate, end_of_turn_suffix
from lmdistill.losses import response_ce_sum, sequence_logprobs
from lmdistill.losses.policy import rloo_loss
from lmdistill.methods.base import ROWS, Batch, Loss, Method, Term, register
from lmdistill.methods.common import FrozenStart, prompt_lengths, sample_responses, student_logits, trained, with_prefix
from lmdistill.models import causal_logits, check_reward_model, load_reward_model


@dataclass
class RLAIFConfig(MethodConfig):
    """RLAIF: RLOO on k student samples per prompt against a reward model, KL penalty to the starting student."""

    reward_model: str = ""
    """The reward model: a directory a `method.name=reward-model` run wrote (<run dir>/model), or any one-label
    `AutoModelForSequenceClassification` directory with the student's tokenizer."""
    num_samples: int = 4
    """k: samples per prompt (the leave-one-out baseline needs k >= 2)."""
    kl_coef: float = 0.05
    """β of the KL penalty to the starting student, in the sequence reward."""
    max_new_tokens: int = 32
    """Length limit of the samples."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of a sample that reached max_new_tokens without EOS."""
    lm_weight: float = 0.0
    """Weight of cross-entropy on the data's responses (0 skips that forward)."""
    eval_prompts: int = 32
    """Held-out prompts sampled (one each, a fixed seed) at every evaluation for eval_reward and eval_kl."""

    def __post_init__(self) -> None:
        checks = [(self.num_samples >= 2, "num_samples", "must be >= 2 (the leave-one-out baseline)"),
                  (self.kl_coef >= 0, "kl_coef", "must be >= 0"),
                  (self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1"),
                  (self.missing_eos_penalty >= 0, "missing_eos_penalty", "must be >= 0"),
                  (self.lm_weight >= 0, "lm_weight", "must be >= 0"),
                  (self.eval_prompts >= 0, "eval_prompts", "must be >= 0")]
        for ok, key, what in checks:
            if not ok:
                raise ValueError(f"method.{key} {what}, got {getattr(self, key)!r}")


@register
class RLAIF(Method):
    """REINFORCE leave-one-out against a distilled reward model, KL-regularised to the starting student."""

    name = "rlaif"
    supports_lora = False
    config_class = RLAIFConfig

    @classmethod
    def prepare_rows(cls, cfg: RLAIFConfig, rows: list[dict], split: str) -> list[dict]:
        if split == "train":  # before anything is written: the reward model directory is one
            if not cfg.reward_model:
                raise ConfigError("method.reward_model is required: the directory a method.name=reward-model run "
                                  "wrote (<run dir>/model)")
            check_reward_model(cfg.reward_model)
        return rows

    def __init__(self, cfg: RLAIFConfig, ctx) -> None:
        super().__init__(cfg, ctx)
        dtype = ctx.cfg.student.dtype if ctx.cfg.student.dtype != "auto" else "float32"
        reward, reward_tokenizer = load_reward_model(cfg.reward_model, dtype=dtype)
        if reward_tokenizer.get_vocab() != ctx.tokenizer.get_vocab():
            raise ConfigError(f"method.reward_model={cfg.reward_model}: its tokenizer is not the student's (the "
                              "reward model scores the student's token ids); train it from a model with the "
                              "student's tokenizer")
        self.reward = reward.to(ctx.device)
        self.reward_pad_id = int(reward.config.pad_token_id)
        ctx.flops.attach(self.reward)
        self.suffix = end_of_turn_suffix(ctx.tokenizer)
        self._reference = FrozenStart(ctx)

    def state_dict(self) -> dict:
        return self._reference.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._reference.load_state_dict(state)

    def sequences(self, batch: Batch) -> Batch:
        k = self.cfg.num_samples
        prompts = {key: batch[key].repeat_interleave(k, 0) for key in ("input_ids", "attention_mask", "labels")}
        sample = sample_responses(self.ctx.model, prompts, self.ctx, max_new_tokens=self.cfg.max_new_tokens)
        return with_prefix(batch, sample, "sample_")

    @torch.no_grad()
    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N,) the reward model's score of right-padded (N, T) prompt + sample rows, minus the missing-EOS
        penalty (module docstring)."""
        eos = self.ctx.tokenizer.eos_token_id
        rows, ended = [], []
        for ids, am, n in zip(input_ids.tolist(), attention_mask.tolist(), prompt_lengths(labels, attention_mask)):
            ids = ids[: sum(am)]
            ended.append(ids[-1] == eos)
            rows.append(Encoded(ids + (self.suffix if ended[-1] else []), n, ""))
        laid = {k: v.to(self.ctx.device) for k, v in collate(rows, self.reward_pad_id).items()}
        score = self.reward(input_ids=laid["input_ids"], attention_mask=laid["attention_mask"]).logits[:, 0].float()
        missing = torch.tensor([not e for e in ended], device=score.device)
        return score - self.cfg.missing_eos_penalty * missing.float()

    def loss(self, model, batch: Batch) -> Loss:
        cfg, k = self.cfg, self.cfg.num_samples
        terms: dict[str, Term] = {}
        if cfg.lm_weight > 0:
            window, labels = trained(batch)
            terms["ce"] = Term(response_ce_sum(student_logits(model, batch, window=window), labels), weight=cfg.lm_weight)
        ids, am = batch["sample_input_ids"], batch["sample_attention_mask"]
        window, labels = trained(batch, "sample_")
        logp, lengths = sequence_logprobs(student_logits(model, batch, "sample_", window), labels)  # (P·k,)
        with torch.no_grad():
            reference = sequence_logprobs(causal_logits(self._reference.model, ids, am, window), labels)[0]
            scores = self.scores(ids, am, batch["sample_labels"])
        prompts = logp.shape[0] // k
        loss, stats = rloo_loss(logp.view(prompts, k), scores.view(prompts, k), reference.view(prompts, k),
                                kl_coef=cfg.kl_coef)
        terms["rloo"] = Term(loss, ROWS)
        samples = float(logp.shape[0])
        metrics = {name: (value, samples) for name, value in stats.items()}
        metrics["sample_len"] = (float(lengths.sum()), samples)
        last = ids.gather(1, am.sum(1, keepdim=True) - 1)  # (P·k, 1) each sample's last token
        metrics["sample_eos"] = (float((last == self.ctx.tokenizer.eos_token_id).sum()), samples)
        return terms, metrics

    @torch.no_grad()
    def heldout_metrics(self, model, examples: list[Encoded]) -> dict[str, float]:
        """On the first ``eval_prompts`` held-out prompts, one sample each (seeded by train.seed, the training
        generator left as it was): ``eval_reward`` (the reward model's mean score, penalty included),
        ``eval_kl`` (mean log p_θ(y|x) − log p_ref(y|x), a sampled estimate of the sequence KL to the start)
        and ``eval_sample_len``."""
        acc = self.ctx.accelerator
        share = examples[: self.cfg.eval_prompts][acc.process_index :: acc.num_processes]
        sums = torch.zeros(4, dtype=torch.float64, device=acc.device)  # score, kl, tokens, samples
        unwrapped = acc.unwrap_model(model)
        size = self.ctx.cfg.eval.batch_size
        for i in range(0, len(share), size):
            batch = {k: v.to(acc.device) for k, v in collate(share[i : i + size], self.ctx.tokenizer.pad_token_id).items()}
            with torch.random.fork_rng(devices=[acc.device] if acc.device.type == "cuda" else []):
                torch.manual_seed(self.ctx.cfg.train.seed)
                sample = sample_responses(unwrapped, batch, self.ctx, max_new_tokens=self.cfg.max_new_tokens)
            window, labels = trained(sample)
            ids, am = sample["input_ids"], sample["attention_mask"]
            with acc.autocast():
                logp, lengths = sequence_logprobs(causal_logits(unwrapped, ids, am, window), labels)
                reference = sequence_logprobs(causal_logits(self._reference.model, ids, am, window), labels)[0]
                score = self.scores(ids, am, sample["labels"])
            sums += torch.stack([score.double().sum(), (logp - reference).double().sum(), lengths.double().sum(),
                                 score.new_tensor(len(score), dtype=torch.float64)])
        sums = acc.reduce(sums, "sum")
        n = float(sums[3].clamp(min=1))
        return {"eval_reward": float(sums[0]) / n, "eval_kl": float(sums[1]) / n, "eval_sample_len": float(sums[2]) / n}
