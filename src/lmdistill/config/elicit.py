"""The ``elicit`` section: knowledge elicitation, `lmdistill elicit TASK CONFIG` (lmdistill.elicit)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmdistill.config.errors import ConfigError


@dataclass
class ElicitConfig:
    """Knowledge elicitation, `lmdistill elicit TASK CONFIG`: the teacher writes training data (lmdistill.elicit)."""

    input_path: str | None = None
    """Input JSONL: `prompt` (or Dolly `instruction` + `context`), optional `id`, optional gold `response` or `answer`. Empty: the `data` section's training rows."""
    output: str | None = None
    """Output JSONL. Default: <run dir>/elicit/<task>.jsonl; refused rows go to <stem>.rejected.jsonl, progress to <stem>.state.json."""
    max_inputs: int = 0
    """Use only the first N inputs (0: all)."""
    batch_size: int = 16
    """Prompts per generation call; the output is flushed (appended, committed) after every batch."""
    max_new_tokens: int = 128
    """Generation limit per teacher response."""
    do_sample: bool = False
    """Sample the teacher (else greedy decoding)."""
    temperature: float = 1.0
    """Teacher sampling temperature (do_sample only)."""
    top_p: float = 1.0
    """Teacher nucleus sampling mass (do_sample only)."""
    seed: int = 0
    """Seed of sampling and of the choice of demonstrations."""
    system_prompt: str | None = None
    """System message for the teacher (chat templates)."""
    engine: Literal["auto", "hf", "vllm"] = "auto"
    """Local teachers: `hf` generates with transformers (batched, KV cache); `vllm` with vLLM; `auto`: vLLM when it is importable and a GPU is present."""
    cot: bool = False
    """label: append `cot_instruction` to every prompt (chain of thought)."""
    cot_instruction: str = "Let's think step by step."
    """label: the chain-of-thought instruction appended to the prompt when `cot`."""
    num_instructions: int = 100
    """expand: new instructions to collect."""
    num_demos: int = 4
    """expand: seed instructions shown per request."""
    rouge_threshold: float = 0.7
    """expand: keep a new instruction only when its ROUGE-L F1 to every existing instruction is below this."""
    max_rounds: int = 0
    """expand: give up after this many batches of candidates (0: 10 x num_instructions / batch_size + 10)."""
    expand_template: str = (
        "Here are some example tasks:\n{demos}\n\nWrite one new task instruction, different from all of the above. "
        "Reply with the instruction only."
    )
    """expand: the request; `{demos}` becomes the numbered demonstrations."""
    rationale_template: str = (
        "{prompt}\n\nExplain your reasoning step by step, then give the final answer on the last line in the form "
        "'Answer: <answer>'."
    )
    """rationales: the request; `{prompt}` is the input. The reply must end with an `Answer:` line."""
    context: str | None = None
    """context: the prefix (instructions) the teacher sees before every prompt."""
    context_file: str | None = None
    """context: a text file whose content is the prefix (after `context`, if both)."""
    context_demos: int = 0
    """context: few-shot demonstrations (input rows with a response) added to the prefix; they are not elicited."""
    demo_template: str = "Question: {prompt}\nAnswer: {response}"
    """context: how one demonstration is written in the prefix."""
    rank: bool = False
    """preferences: order each pair by the teacher's length-normalised log-prob (needs a teacher that scores: `token`)."""
    student_temperature: float = 1.0
    """preferences: the student's sampling temperature."""
    student_top_p: float = 1.0
    """preferences, judge: the student's nucleus sampling mass."""
    num_samples: int = 1
    """preferences: student samples per prompt. Above 1 needs `rank`: the teacher's response and the samples are ranked by the teacher's length-normalised log-prob into `ranking` (best first; for method.form=pro), chosen the best and rejected the worst."""
    meta_path: str | None = None
    """curate: YAML file of `topics`, `skills` and `formats` (lists of strings); every combination is asked once, in an order drawn with `seed` (example: src/lmdistill/data/curate_meta.yaml)."""
    curate_template: str = (
        "Write one new instruction or question for an AI assistant about {topic}. It should ask the assistant to "
        "{skill}, and the answer should be {format}. Reply with the instruction only."
    )
    """curate: the request for one instruction; `{topic}`, `{skill}`, `{format}` come from the meta file. The teacher then answers the instruction (filtered as in expand: ROUGE-L, 3 to 150 words)."""
    judge: Literal["pairwise", "pointwise"] = "pairwise"
    """judge: `pairwise` asks A or B in both orders (a pair is kept only when both orders agree); `pointwise` scores each response on the rubric."""
    judge_rubric: str | None = None
    """judge: the criteria, `{rubric}` in the templates. Empty: lmdistill.judging.RUBRIC ("Judge whether it is correct, helpful and clear.")."""
    pointwise_template: str | None = None
    """judge (pointwise): the request; slots `{prompt}`, `{response}`, `{rubric}`, `{low}`, `{high}`. Empty: lmdistill.judging.POINTWISE_TEMPLATE (asks for 'Score: <number>')."""
    pairwise_template: str | None = None
    """judge (pairwise): the request; slots `{prompt}`, `{a}`, `{b}`, `{rubric}`. Empty: lmdistill.judging.PAIRWISE_TEMPLATE (asks for 'Answer: A' or 'Answer: B')."""
    score_min: int = 1
    """judge (pointwise): the lowest score of the scale."""
    score_max: int = 10
    """judge (pointwise): the highest score of the scale."""
    judge_votes: int = 1
    """judge: answers asked per question (per order, per response); more than 1 needs do_sample=true. Pairwise: the majority of each order counts; pointwise: the mean score."""
    judge_student_samples: int = 0
    """judge: student samples added to each row's responses (`responses`, else `chosen` + `rejected`, else `response`), at student_temperature."""

    def __post_init__(self) -> None:
        checks = [
            (self.max_inputs >= 0, "max_inputs", "must be >= 0"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1"),
            (self.temperature > 0, "temperature", "must be > 0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.student_temperature > 0, "student_temperature", "must be > 0"),
            (0 < self.student_top_p <= 1, "student_top_p", "must be in (0, 1]"),
            (self.num_instructions >= 1, "num_instructions", "must be >= 1"),
            (self.num_demos >= 1, "num_demos", "must be >= 1"),
            (0 < self.rouge_threshold <= 1, "rouge_threshold", "must be in (0, 1]"),
            (self.max_rounds >= 0, "max_rounds", "must be >= 0"),
            (self.context_demos >= 0, "context_demos", "must be >= 0"),
            (self.num_samples >= 1, "num_samples", "must be >= 1"),
            (self.num_samples == 1 or self.rank, "num_samples",
             "above 1 needs elicit.rank=true (the teacher ranks the samples)"),
            ("{demos}" in self.expand_template, "expand_template", "must contain {demos}"),
            ("{prompt}" in self.rationale_template, "rationale_template", "must contain {prompt}"),
            ("{topic}" in self.curate_template, "curate_template", "must contain {topic}"),
            (self.score_min < self.score_max, "score_max", f"must be above elicit.score_min ({self.score_min})"),
            (self.judge_votes >= 1, "judge_votes", "must be >= 1"),
            (self.judge_votes == 1 or self.do_sample, "judge_votes", "> 1 asks the same question again: set elicit.do_sample=true"),
            (self.judge_student_samples >= 0, "judge_student_samples", "must be >= 0"),
            (self.pointwise_template is None or "{response}" in self.pointwise_template, "pointwise_template",
             "must contain {response}"),
            (self.pairwise_template is None or "{a}" in self.pairwise_template and "{b}" in self.pairwise_template,
             "pairwise_template", "must contain {a} and {b}"),
        ]
        for ok, key, what in checks:
            if not ok:
                raise ConfigError(f"elicit.{key} {what}, got {getattr(self, key)!r}")
