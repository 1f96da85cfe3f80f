"""Losses of lmdistill: pure functions, float32 inside, one masked reduction, plain dict registries.

- Token divergences (METHODS.md): ``fkl``, ``rkl``, ``jsd``, ``skl``, ``srkl``, ``tvd``, ``akl``,
  each ``fn(student_logits, teacher, mask, *, temperature=1.0, per_token=False, reduction="mean", **params)``
  with a dense (B, T, V) teacher or a ``TopK`` one; registry ``LOSSES``.
- ``chunked_divergence``: the same from the student's hidden states and head, chunk by chunk.
- Sequence pieces: ``token_logprobs``, ``sequence_logprobs``, ``prediction_mask``, ``response_ce_sum``; preference losses ``dpkd``,
  ``dpo``, ``ipo``, ``cpo``, ``simpo`` returning ``(loss, metrics)``.
"""

from ._common import TopK, log_distributions, masked_reduce, sample_tail
from .chunked import chunked_divergence
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
from .preference import cpo, dpkd, dpo, ipo, simpo
from .sequence import prediction_mask, response_ce_sum, sequence_logprobs, token_logprobs

__all__ = [
    "KERNELS",
    "LOSSES",
    "TopK",
    "sample_tail",
    "akl",
    "akl_weights",
    "chunked_divergence",
    "cpo",
    "divergence_from_logprobs",
    "dpkd",
    "dpo",
    "fkl",
    "ipo",
    "jsd",
    "log_distributions",
    "masked_reduce",
    "prediction_mask",
    "response_ce_sum",
    "rkl",
    "sequence_logprobs",
    "simpo",
    "skl",
    "srkl",
    "token_logprobs",
    "tvd",
]
