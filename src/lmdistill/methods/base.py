"""What a method is: where its sequences come from, which loss applies, what it needs from a teacher.

The training loop (`lmdistill.train.fit`) is the same for every method. Per micro-batch it calls
``method.sequences(batch)`` (data as it is, teacher generations, student samples, ...) and then
``method.loss(model, batch)``, which returns the loss **summed** over the batch's trained tokens;
the loop divides by the number of trained tokens of the whole optimizer step (every
accumulation micro-batch on every process), so the gradient does not depend on how the global
batch is split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from lmdistill.config import MethodConfig, RunConfig, register_method_config
from lmdistill.teachers.base import Capability

if TYPE_CHECKING:
    from accelerate import Accelerator

    from lmdistill.teachers import Teacher
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Batch = dict[str, torch.Tensor]


@dataclass
class FlopCounter:
    """Cumulative compute: 6·N·tokens for student updates, 2·N·tokens for every other forward."""

    train: float = 0.0
    other: float = 0.0

    def add_update(self, n_params: int, tokens: int) -> None:
        """A student forward + backward over `tokens` tokens."""
        self.train += 6.0 * n_params * tokens

    def add_forward(self, n_params: int, tokens: int) -> None:
        """A forward without update (teacher, evaluation, generation) over `tokens` tokens."""
        self.other += 2.0 * n_params * tokens

    @property
    def total(self) -> float:
        return self.train + self.other


@dataclass
class RunContext:
    """What a method may use during a run."""

    cfg: RunConfig
    tokenizer: PreTrainedTokenizerBase
    accelerator: Accelerator
    student_params: int
    flops: FlopCounter = field(default_factory=FlopCounter)
    step: int = 0
    teacher: Teacher | None = None
    teacher_params: int = 0
    model: torch.nn.Module | None = None
    """The student as the loop prepared it (wrapped for DDP when there are several processes)."""
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    """The method's extra trainable modules (:meth:`Method.extra_modules`) as the loop prepared them."""

    def count_teacher_forward(self, tokens: int) -> None:
        """Add a teacher forward over `tokens` tokens to the run's compute."""
        self.flops.add_forward(self.teacher_params, tokens)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


class Method:
    """Base class: SFT behaviour (data sequences, cross-entropy). Subclasses override the parts they change."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    needs: ClassVar[Capability | None] = None
    """Least teacher capability required (None: no teacher)."""

    def __init__(self, cfg: MethodConfig, ctx: RunContext) -> None:
        self.cfg = cfg
        self.ctx = ctx

    @classmethod
    def prepare_rows(cls, cfg: MethodConfig, rows: list[dict], split: str) -> list[dict]:
        """The rows this method trains (`split="train"`) or is evaluated (`"eval"`) on, from the data's rows.

        Default: the rows as they are. A method that needs a field (a rationale, a context) checks it
        here, so that a missing one stops the run before anything is written.
        """
        return rows

    def sequences(self, batch: Batch) -> Batch:
        """The micro-batch to train on, given a micro-batch of data (default: the data itself)."""
        return batch

    def loss(self, model: PreTrainedModel, batch: Batch) -> tuple[torch.Tensor, dict[str, tuple[float, float]]]:
        """Summed loss over the batch's trained tokens (scalar), and metrics to log as (sum, count) pairs.

        The loop adds sums and counts over micro-batches and processes and logs sum / count.
        """
        raise NotImplementedError

    def extra_modules(self, student: PreTrainedModel) -> dict[str, torch.nn.Module]:
        """Trainable modules besides the student (e.g. a projection of its hidden states), by name.

        Called once by the loop, with the (unwrapped) student, before the optimizer is made. The loop
        moves them to the device and wraps them for DDP (the method reaches them, prepared, as
        ``self.ctx.modules[name]``), optimises and clips them with the student, and keeps them in
        checkpoints (accelerate's ``model_<i>.safetensors``, i = 1, 2, ... in this order); they are not part of
        the saved model. Default: none.
        """
        return {}

    def state_dict(self) -> dict:
        """Method state that a checkpoint must keep (replay buffers, counters)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method selectable as `method.name=<cls.name>`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    METHODS[cls.name] = cls
    register_method_config(cls.name, cls.config_class)
    return cls


def method_rows(cfg: RunConfig) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows of a run, as its method trains and evaluates on them (see `Method.prepare_rows`)."""
    from lmdistill.data import load_rows

    train, held = load_rows(cfg.data)
    method = METHODS[cfg.method.name]
    return method.prepare_rows(cfg.method, train, "train"), method.prepare_rows(cfg.method, held, "eval")


def missing_field(rows: list[dict], name: str, *, method: str, how: str) -> None:
    """Raise a DataError naming the first row (file:line) without a non-empty string field `name`."""
    from lmdistill.data.rows import DataError

    for row in rows:
        value = row.get(name)
        if not isinstance(value, str) or not value.strip():
            where = row.get("_where") or f"row {row.get('id', '?')}"
            raise DataError(f"{where}: method {method!r} needs field {name!r} in every row; {how}")


def make_method(cfg: MethodConfig, ctx: RunContext) -> Method:
    """Instantiate the method a config names."""
    return METHODS[cfg.name](cfg, ctx)
