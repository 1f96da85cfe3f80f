"""What a method is: where its sequences come from, which loss terms apply, what it needs from a teacher.

The training loop (`lmdistill.train.fit`) is the same for every method. Per micro-batch it calls
``method.sequences(batch)`` (data as it is, teacher generations, student samples, ...) and then
``method.loss(model, batch)``, which returns its loss as named :class:`Term` s: a value **summed**
over the term's units (the trained tokens of one of the batch's label tensors, or its rows) and a
weight. The loop counts each term's units over the whole optimizer step (every accumulation
micro-batch on every process) and adds ``weight · sum / count`` once, so that the gradient does not
depend on how the global batch is split and no method scales its terms to survive the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from lmdistill.config import MethodConfig, RunConfig
from lmdistill.data import load_rows
from lmdistill.data.rows import DataError
from lmdistill.data.tokenize import Encoded, response_token_count
from lmdistill.flops import FlopMeter
from lmdistill.models import save_model
from lmdistill.teachers.base import Needs, Teacher

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Batch = dict[str, torch.Tensor]
Metrics = dict[str, tuple[float, float]]
"""Numbers to log, each as (sum, count): the loop adds both over micro-batches and processes, logs sum / count."""

ROWS = "rows"
"""A term's unit: the batch's rows (pairs, sequences), e.g. a preference loss."""


@dataclass
class Term:
    """One loss term of a micro-batch: `value` summed over its units; the loop adds weight · Σ value / Σ units.

    `per` names the units: a label key of the batch (``"labels"``, ``"sample_labels"``, ...: its trained
    tokens) or :data:`ROWS` (the batch's rows).
    """

    value: torch.Tensor
    """Scalar, summed over the term's units of this micro-batch."""
    per: str = "labels"
    weight: float = 1.0


Loss = tuple[dict[str, Term], Metrics]


def term_units(batch: Batch, per: str) -> float:
    """How many units of kind `per` (see :class:`Term`) a micro-batch holds."""
    if per == ROWS:
        return float(batch["input_ids"].shape[0])
    if per not in batch:
        raise KeyError(f"a loss term is normalised per {per!r}, which the batch does not have ({', '.join(batch)})")
    return float(response_token_count(batch[per]))


@dataclass
class RunContext:
    """What a method may use during a run."""

    cfg: RunConfig
    tokenizer: PreTrainedTokenizerBase
    accelerator: Accelerator
    flops: FlopMeter = field(default_factory=FlopMeter)
    """The run's compute, counted by hooks on every model (lmdistill.flops); methods count by hand only what
    runs outside a model's forward (the chunked loss's head)."""
    step: int = 0
    teacher: Teacher | None = None
    model: torch.nn.Module | None = None
    """The student as the loop prepared it (wrapped for DDP when there are several processes)."""
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    """The method's extra trainable modules (:meth:`Method.extra_modules`) as the loop prepared them."""

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


class Method:
    """Base class: SFT behaviour (data sequences, cross-entropy). Subclasses override the parts they change."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    supports_lora: ClassVar[bool] = True
    """False: a run with `student.lora` is refused (the method saves or copies the student its own way)."""
    needs: ClassVar[Needs] = Needs()
    """What the method needs from its teacher (default: no teacher); see :meth:`teacher_needs`."""

    def __init__(self, cfg: MethodConfig, ctx: RunContext) -> None:
        self.cfg = cfg
        self.ctx = ctx

    @classmethod
    def teacher_needs(cls, cfg: MethodConfig) -> Needs:
        """What this method with options `cfg` needs from its teacher (checked before anything is written)."""
        return cls.needs

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

    def loss(self, model: PreTrainedModel, batch: Batch) -> Loss:
        """The micro-batch's loss terms by name (each logged as Σ value / Σ units), and extra metrics."""
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

    def heldout_metrics(self, model: torch.nn.Module, examples: list[Encoded]) -> dict[str, float]:
        """The method's own held-out numbers, logged with the loop's at every evaluation (e.g. a reward model's
        pairwise accuracy). `examples`: the held-out rows as the loop encoded them. Called on every process,
        which must agree on the result. Default: none."""
        return {}

    def save_model(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path,
                   state_dict: dict[str, torch.Tensor] | None) -> None:
        """Write the trained model to `directory` at the end of the run (main process only; `state_dict` as
        :func:`lmdistill.models.save_model` takes it). Default: the student as a plain HF directory."""
        save_model(model, tokenizer, directory, state_dict=state_dict)

    def state_dict(self) -> dict:
        """Method state that a checkpoint must keep (replay buffers, counters, teacher outputs).

        Called on every process at each checkpoint (so it may gather from the others); process 0's is
        saved and every process restores it."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method selectable as `method.name=<cls.name>`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    METHODS[cls.name] = cls
    return cls


def method_rows(cfg: RunConfig) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows of a run, as its method trains and evaluates on them (see `Method.prepare_rows`)."""
    train, held = load_rows(cfg.data)
    method = METHODS[cfg.method.name]
    return method.prepare_rows(cfg.method, train, "train"), method.prepare_rows(cfg.method, held, "eval")


def missing_field(rows: list[dict], name: str, *, method: str, how: str) -> None:
    """Raise a DataError naming the first row (file:line) without a non-empty string field `name`."""
    for row in rows:
        value = row.get(name)
        if not isinstance(value, str) or not value.strip():
            where = row.get("_where") or f"row {row.get('id', '?')}"
            raise DataError(f"{where}: method {method!r} needs field {name!r} in every row; {how}")


def make_method(cfg: MethodConfig, ctx: RunContext) -> Method:
    """Instantiate the method a config names."""
    return METHODS[cfg.name](cfg, ctx)
