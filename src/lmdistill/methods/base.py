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

if TYPE_CHECKING:
    from accelerate import Accelerator
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

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


class Method:
    """Base class: SFT behaviour (data sequences, cross-entropy). Subclasses override the parts they change."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    needs: ClassVar[str | None] = None
    """Teacher capability required (`full`, `topk`, `token`, `text`) or None."""

    def __init__(self, cfg: MethodConfig, ctx: RunContext) -> None:
        self.cfg = cfg
        self.ctx = ctx

    def sequences(self, batch: Batch) -> Batch:
        """The micro-batch to train on, given a micro-batch of data (default: the data itself)."""
        return batch

    def loss(self, model: PreTrainedModel, batch: Batch) -> tuple[torch.Tensor, dict[str, tuple[float, float]]]:
        """Summed loss over the batch's trained tokens (scalar), and metrics to log as (sum, count) pairs.

        The loop adds sums and counts over micro-batches and processes and logs sum / count.
        """
        raise NotImplementedError

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


def make_method(cfg: MethodConfig, ctx: RunContext) -> Method:
    """Instantiate the method a config names."""
    return METHODS[cfg.name](cfg, ctx)
