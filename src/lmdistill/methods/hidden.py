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
from torch import nn

from lmdistill.config import ConfigError, MethodConfig
from lmdistill.losses import hidden_state_distance, prediction_mask, response_ce_sum
from lmdistill.methods.base import Batch, Loss, Method, Term, register
from lmdistill.methods.common import trained
from lmdistill.models import logits_to_keep
from lmdistill.teachers import Capability, Needs


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


@register
class Hidden(Method):
    """Hidden-state matching with a learned projection (FitNets / TinyBERT), plus CE on the data's responses.

    Matched at the positions that predict a response token (prompt and padding positions are left
    out), so the term is a per-response-token mean like CE. Needs a local teacher: its hidden
    states, not only its distributions.
    """

    name = "hidden"
    config_class = HiddenConfig
    needs = Needs(Capability.FULL, weights="its hidden states",
                  no_prefix="it aligns the teacher's hidden states with the student's position by position")

    def __init__(self, cfg: HiddenConfig, ctx) -> None:
        super().__init__(cfg, ctx)
        self.layer_map: list[list[int]] = []
        """The (student layer, teacher layer) pairs, set by :meth:`extra_modules`."""

    def extra_modules(self, student: nn.Module) -> dict[str, nn.Module]:
        """The projection, one linear map per layer pair (checks the layer map against both models)."""
        teacher_model = self.ctx.teacher.weights
        n_s, n_t = num_layers(student), num_layers(teacher_model)
        self.layer_map = [list(p) for p in self.cfg.layer_map] if self.cfg.layer_map else default_layer_map(n_s, n_t)
        check_layer_map(self.layer_map, n_s, n_t)
        return {"projection": HiddenProjection(len(self.layer_map), hidden_size(student), hidden_size(teacher_model))}

    def loss(self, model, batch: Batch) -> Loss:
        ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        window, cut = trained(batch)
        out = model(input_ids=ids, attention_mask=am, output_hidden_states=True, **logits_to_keep(window, ids))
        with torch.no_grad():
            # Its logits are not used: keep one position's.
            teacher_out = self.ctx.teacher.weights(input_ids=ids, attention_mask=am, output_hidden_states=True,
                                                   logits_to_keep=1)
        teacher_hidden = teacher_out.hidden_states  # (L_T + 1) x (B, T, d_T)
        projected = self.ctx.modules["projection"]([out.hidden_states[s] for s, _ in self.layer_map])
        hidden = hidden_state_distance(projected, [teacher_hidden[t] for _, t in self.layer_map], prediction_mask(labels),
                                       distance=self.cfg.loss, reduction="sum")
        return {f"hidden_{self.cfg.loss}": Term(hidden, weight=self.cfg.weight),
                "ce": Term(response_ce_sum(out.logits, cut), weight=self.cfg.ce_weight)}, {}
