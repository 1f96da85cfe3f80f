"""`hidden`: match the teacher's hidden states through a learned projection, plus CE on the data (METHODS.md).

Layers are numbered as transformers returns them with ``output_hidden_states=True``: 0 is the
embedding output, l (1..L) the output of block l, the last one after the final norm. A layer map
pairs student layers with teacher layers; each pair gets its own linear map from the student's
width to the teacher's (FitNets' "regressor", Romero et al. 2015; TinyBERT's W_h, Jiao et al. 2020),
trained with the student through :meth:`Method.extra_modules` and kept in checkpoints, never in
the saved student.

Per trained position t (the positions that predict a response token, as for ``kd``):
``h_t = mean over pairs (s, l) of d(W_s·h^S_{s,t} + b_s, h^T_{l,t})``, with
``d = mean_j (x_j − y_j)²`` (mse, per teacher dimension) or ``1 − cos(x, y)`` (cosine), and the
loss ``weight·Σ_t h_t + ce_weight·CE`` (summed; the loop divides by the response tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmdistill.config import ConfigError, MethodConfig
from lmdistill.losses import masked_reduce
from lmdistill.methods.base import Batch, Method, RunContext, register
from lmdistill.methods.common import prediction_mask
from lmdistill.methods.sft import response_ce_sum
from lmdistill.teachers import Capability, CapabilityError


@dataclass
class HiddenConfig(MethodConfig):
    """Hidden-state matching: weight·d(projected student layers, teacher layers) + ce_weight·CE(data)."""

    layer_map: list[list[int]] | None = None
    """Pairs [student_layer, teacher_layer] (0 = embeddings, L = last, after the final norm). Empty: every student layer 1..L_S onto teacher layer round(i·L_T/L_S), last onto last."""
    loss: Literal["mse", "cosine"] = "mse"
    """Distance between projected student and teacher hidden states: `mse` (mean over the teacher's dimensions) or `cosine` (1 − cosine similarity)."""
    weight: float = 1.0
    """Weight of the hidden-state term."""
    ce_weight: float = 1.0
    """Weight of cross-entropy on the data's responses."""

    def __post_init__(self) -> None:
        if self.layer_map is not None:
            if not self.layer_map:
                raise ValueError("method.layer_map is empty; leave it unset for the default map, or give [s, t] pairs")
            for i, pair in enumerate(self.layer_map):
                if len(pair) != 2 or any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in pair):
                    raise ValueError(
                        f"method.layer_map[{i}] = {pair!r}: expected a pair [student_layer, teacher_layer] of "
                        "integers >= 0 (0 = embeddings)"
                    )
        if self.weight < 0 or self.ce_weight < 0 or self.weight + self.ce_weight == 0:
            raise ValueError(
                f"method.weight ({self.weight}) and method.ce_weight ({self.ce_weight}) must be >= 0, not both 0"
            )


def num_layers(model: nn.Module) -> int:
    """Transformer blocks of a causal LM (its hidden states run 0..this)."""
    return int(model.config.get_text_config().num_hidden_layers)


def hidden_size(model: nn.Module) -> int:
    """Width of a causal LM's hidden states."""
    return int(model.config.get_text_config().hidden_size)


def default_layer_map(n_student: int, n_teacher: int) -> list[list[int]]:
    """Student layers 1..n_student evenly onto teacher layers 1..n_teacher, the last onto the last.

    Student layer i goes to round(i·n_teacher / n_student) (halves up), at least 1; e.g. 2 onto 4 layers:
    [[1, 2], [2, 4]], 3 onto 2: [[1, 1], [2, 1], [3, 2]].
    """
    return [[i, max(1, (2 * i * n_teacher + n_student) // (2 * n_student))] for i in range(1, n_student + 1)]


def check_layer_map(layer_map: list[list[int]], n_student: int, n_teacher: int) -> None:
    """Raise a ConfigError naming `method.layer_map[i]` when a pair names a layer a model does not have."""
    for i, (s, t) in enumerate(layer_map):
        for which, layer, n in (("student", s, n_student), ("teacher", t, n_teacher)):
            if layer > n:
                raise ConfigError(
                    f"method.layer_map[{i}] = [{s}, {t}]: the {which} has no layer {layer}; its layers are "
                    f"0 (embeddings) to {n} (last)"
                )


class HiddenProjection(nn.Module):
    """One linear map per layer pair, from the student's hidden width to the teacher's."""

    def __init__(self, n_pairs: int, student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.maps = nn.ModuleList(nn.Linear(student_width, teacher_width) for _ in range(n_pairs))

    def forward(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """(B, T, d_S) per pair → (B, T, d_T) per pair."""
        return [m(h.to(m.weight.dtype)) for m, h in zip(self.maps, hidden)]


def hidden_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, T) distance per position between (B, T, d) hidden states, in float32: mse or 1 − cosine."""
    s, t = student.float(), teacher.float()
    if kind == "mse":
        return (s - t).pow(2).mean(-1)
    return 1.0 - F.cosine_similarity(s, t, dim=-1)


@register
class Hidden(Method):
    """Hidden-state matching with a learned projection (FitNets / TinyBERT), plus CE on the data's responses.

    Matched at the positions that predict a response token (prompt and padding positions are left
    out), so the term is a per-response-token mean like CE. Needs a local teacher: its hidden
    states, not only its distributions.
    """

    name = "hidden"
    config_class = HiddenConfig
    needs = Capability.FULL

    def __init__(self, cfg: HiddenConfig, ctx: RunContext) -> None:
        super().__init__(cfg, ctx)
        teacher = ctx.teacher
        if teacher is not None and not isinstance(getattr(teacher, "model", None), nn.Module):
            raise CapabilityError(
                f"method 'hidden' needs the teacher's hidden states, which the {teacher.name} teacher does not give; "
                "use a local teacher (teacher.kind=local teacher.model.path=...)"
            )
        if getattr(teacher, "prefix_ids", None):
            raise CapabilityError("method 'hidden' aligns the teacher's hidden states with the student's position by "
                                  "position; leave teacher.prefix empty")
        self.layer_map: list[list[int]] = []

    def extra_modules(self, student: nn.Module) -> dict[str, nn.Module]:
        """The projection, one linear map per layer pair (checks the layer map against both models)."""
        teacher_model = self.ctx.teacher.model
        n_s, n_t = num_layers(student), num_layers(teacher_model)
        self.layer_map = [list(p) for p in self.cfg.layer_map] if self.cfg.layer_map else default_layer_map(n_s, n_t)
        check_layer_map(self.layer_map, n_s, n_t)
        return {"projection": HiddenProjection(len(self.layer_map), hidden_size(student), hidden_size(teacher_model))}

    def loss(self, model, batch: Batch):
        ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        out = model(input_ids=ids, attention_mask=am, output_hidden_states=True)
        with torch.no_grad():
            self.ctx.count_teacher_forward(int(am.sum()))
            teacher_out = self.ctx.teacher.model(input_ids=ids, attention_mask=am, output_hidden_states=True)
        teacher_hidden = teacher_out.hidden_states  # (L_T + 1) x (B, T, d_T)
        projected = self.ctx.modules["projection"]([out.hidden_states[s] for s, _ in self.layer_map])
        per_token = torch.stack(
            [hidden_distance(p, teacher_hidden[t], self.cfg.loss) for p, (_, t) in zip(projected, self.layer_map)]
        ).mean(0)  # (B, T)
        mask = prediction_mask(labels)
        n = float(mask.sum())
        hidden = masked_reduce(per_token, mask, "sum")
        ce = response_ce_sum(out.logits, labels)
        loss = self.cfg.weight * hidden + self.cfg.ce_weight * ce
        return loss, {"ce": (ce.item(), n), f"hidden_{self.cfg.loss}": (hidden.item(), n)}
