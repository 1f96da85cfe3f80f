"""Knowledge elicitation: the teacher writes training data (`lmdistill elicit TASK CONFIG`).

Tasks (seed 001's taxonomy), one module each, writing rows that
:func:`lmdistill.data.rows.read_jsonl` reads back:

=============  =============================================================================
task           row written (besides ``id``, ``provenance``)
=============  =============================================================================
label          ``prompt``, ``response`` (the teacher's), ``reference``, ``cot_prompt``
expand         ``prompt`` (a new instruction, ROUGE-L filtered), ``response``,
               ``rouge_l_max``, ``most_similar``, ``demo_ids`` (self-instruct)
rationales     ``prompt``, ``rationale``, ``response``, ``gold``, ``answer_correct``
               (distilling step-by-step)
context        ``prompt`` (without the prefix), ``response``, ``context`` (the prefix)
preferences    ``prompt``, ``chosen``, ``rejected``, ``response``, ``chosen_source``, with
               ``elicit.rank`` ``teacher_logprob_chosen`` / ``_rejected``
curate         ``prompt`` (an instruction written for a topic × skill × format of a meta file,
               ROUGE-L filtered), ``response``, ``topic``, ``skill``, ``format``,
               ``rouge_l_max``, ``most_similar`` (UltraChat, Phi)
judge          ``prompt``, ``chosen``, ``rejected``, ``response``, ``margin``, ``chosen_source``,
               ``rejected_source``, ``responses``, ``sources``, ``scores`` (pointwise),
               ``judge``, ``judgements`` (the teacher grades responses: pairwise in both
               orders, or pointwise on a rubric; parsing in :mod:`lmdistill.judging`)
=============  =============================================================================

Every row carries ``provenance``: the task, the teacher's name, the sampling parameters (with the
batch's seed), the system prompt and the time (UTC). :mod:`.session` holds what the tasks share
(teacher, student, sampling, seeds), :mod:`.run` the dispatcher :func:`elicit`, :mod:`.store`
the crash-safe, resumable output, :mod:`.vllm_engine` the vLLM teacher.
"""

from lmdistill.elicit.expand import RougeL, clean_instruction
from lmdistill.elicit.inputs import load_inputs, read_inputs
from lmdistill.elicit.preferences import teacher_mean_logprobs
from lmdistill.elicit.rationales import parse_rationale
from lmdistill.elicit.run import TASKS, ElicitResult, elicit
from lmdistill.elicit.store import ElicitStore

__all__ = [
    "TASKS",
    "ElicitResult",
    "ElicitStore",
    "RougeL",
    "clean_instruction",
    "elicit",
    "load_inputs",
    "parse_rationale",
    "read_inputs",
    "teacher_mean_logprobs",
]
