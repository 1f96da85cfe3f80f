"""Knowledge elicitation: the teacher writes training data (`lmdistill elicit TASK CONFIG`).

Tasks (seed 001's taxonomy): ``label`` (teacher answers), ``expand`` (self-instruct),
``rationales`` (distilling step-by-step), ``context`` (context distillation), ``preferences``
(teacher vs student pairs). See :mod:`lmdistill.elicit.pipelines` for the rows each writes and
:mod:`lmdistill.elicit.store` for how the output survives a crash and resumes.
"""

from lmdistill.elicit.pipelines import (
    TASKS,
    ElicitResult,
    RougeL,
    clean_instruction,
    elicit,
    load_inputs,
    parse_rationale,
    read_inputs,
    teacher_mean_logprobs,
)
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
