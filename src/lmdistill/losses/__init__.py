"""Losses of lmdistill: pure functions, float32 inside, one masked reduction, plain dict registries.

- Token divergences (METHODS.md): ``fkl``, ``rkl``, ``jsd``, ``skl``, ``srkl``, ``tvd``, ``akl``,
  each ``fn(student_logits, teacher, mask, *, temperature=1.0, per_token=False, reduction="mean", **params)``
  with a dense (B, T, V) teacher or a ``TopK`` one; registry ``LOSSES``.
- ``chunked_divergence``: the same from the student's hidden states and head, chunk by chunk;
  ``chunked_divergence_and_ce`` also the data cross-entropy from the same chunks' logits.
- Sequence pieces: ``token_logprobs``, ``sequence_logprobs``, ``prediction_mask``, ``trained_window``,
  ``response_ce_sum``; preference losses ``dpkd``,
  ``dpo``, ``ipo``, ``cpo``, ``simpo`` returning ``(loss, metrics)``, the same behind one signature in
  the registry ``PREFERENCE_FORMS`` (``NEEDS_REFERENCE``: the forms that take reference log-probs);
  ``bradley_terry`` (a reward model's pairwise loss), ``plackett_luce`` and the listwise form ``pro``
  (registry ``LISTWISE_FORMS``).
- ``score_function_rkl``: the score-function estimator of the sequence reverse KL from sampled-token
  log-probs, with a leave-one-out baseline (``leave_one_out_baseline``).
- Hidden-state distances ``mse_distance``, ``cosine_distance`` (registry ``HIDDEN_DISTANCES``) and
  ``hidden_state_distance`` over layer pairs and masked positions.
- Cross-tokenizer divergences (teacher and student vocabularies differ): ``uld`` (sorted probabilities)
  and ``span_divergence`` (merged spans).
- MiniLLM's policy gradient: ``losses.policy`` (``minillm_loss`` and its pieces); REINFORCE leave-one-out
  against a sequence reward with a KL penalty: ``losses.policy.rloo_loss``.
"""

from ._common import TopK, log_distributions, masked_reduce, sample_tail
from .chunked import chunked_divergence, chunked_divergence_and_ce
from .cross_tokenizer import span_divergence, uld
from .divergences import (
    KERNELS,
    LOSSES,
    akl,
    akl_weights,
    divergence_from_logprobs,
    fkl,
    jsd,
    rkl,
    skl,
    srkl,
    tvd,
)
from .hidden import HIDDEN_DISTANCES, cosine_distance, hidden_state_distance, mse_distance
from .preference import (LISTWISE_FORMS, NEEDS_REFERENCE, PREFERENCE_FORMS, PreferenceForm, bradley_terry, cpo, dpkd,
                         dpo, ipo, plackett_luce, pro, simpo)
from .score_function import leave_one_out_baseline, score_function_rkl
from .sequence import prediction_mask, response_ce_sum, sequence_logprobs, token_logprobs, trained_window

__all__ = [
    "HIDDEN_DISTANCES",
    "KERNELS",
    "LISTWISE_FORMS",
    "LOSSES",
    "NEEDS_REFERENCE",
    "PREFERENCE_FORMS",
    "PreferenceForm",
    "TopK",
    "sample_tail",
    "akl",
    "akl_weights",
    "bradley_terry",
    "chunked_divergence",
    "chunked_divergence_and_ce",
    "cosine_distance",
    "cpo",
    "divergence_from_logprobs",
    "dpkd",
    "dpo",
    "fkl",
    "hidden_state_distance",
    "ipo",
    "jsd",
    "leave_one_out_baseline",
    "log_distributions",
    "masked_reduce",
    "mse_distance",
    "plackett_luce",
    "prediction_mask",
    "pro",
    "trained_window",
    "response_ce_sum",
    "rkl",
    "score_function_rkl",
    "sequence_logprobs",
    "simpo",
    "skl",
    "span_divergence",
    "srkl",
    "token_logprobs",
    "tvd",
    "uld",
]
