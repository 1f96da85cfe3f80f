"""Compute accounting: one rule, applied where the forwards happen (DESIGN.md, "Compute accounting").

A :class:`FlopMeter` is attached to every model of a run (the student, the teacher's models, a
frozen reference) by a forward pre-hook, so it counts each forward wherever it is called from
(the loss, a sampler, a teacher wrapper, an evaluation) and nobody counts by hand:

- a forward with gradient through trainable parameters: 4·N + 2·N_trained per token → ``train``: the
  forward (2·N), the gradient with respect to every layer's input, frozen or not (2·N: the chain rule
  needs it to reach the trained parameters below), and the weight gradients of the trained parameters
  (2·N_trained). Training every weight that is 6·N; a LoRA student (N_trained: its adapters and
  modules_to_save) pays 4·N plus its adapters' share. An over-count by the input gradients below the
  lowest trained parameter, which nothing needs (with LoRA on every linear layer: none but the embedding's);
- every other forward (teacher, reference model, evaluation, sampling): 2·N per token → ``other``;

where N is the model's parameter count without the input embedding (a LoRA model's: its base and its
adapters) and N_trained the part of it that requires gradients; a token is a position
that is computed: the non-padded new positions of the call (with a KV cache, generation counts
its prefill once and then one position per row and step). The output head's share of N counts
only at the positions whose logits the forward computes (``logits_to_keep``: the response window
of a loss, the last position of a generation's prefill); a head applied outside the forward (the
chunked loss) is added by its caller (:meth:`FlopMeter.add`).
"""

from __future__ import annotations

import torch


def _computing(model: torch.nn.Module) -> dict[int, torch.nn.Parameter]:
    """The parameters a forward of `model` computes with, each once (tied weights once). A peft
    ``ModulesToSaveWrapper`` holds a frozen original of a module beside the trained copy that runs in its
    place: the original is left out."""
    idle = {id(p) for m in model.modules() if hasattr(m, "original_module") and hasattr(m, "modules_to_save")
            for p in m.original_module.parameters()}
    return {id(p): p for p in model.parameters() if id(p) not in idle}


def count_parameters(model: torch.nn.Module, *, non_embedding: bool = True, trainable: bool = False) -> int:
    """Parameters of a model; with `non_embedding`, the input embedding is left out (as FLOP counts do); with
    `trainable`, only those that require gradients (N_trained).

    Tied weights count once; an input embedding tied to the output head stays (the head's matmul is compute).
    """
    params = [p for p in _computing(model).values() if p.requires_grad or not trainable]
    total = sum(p.numel() for p in params)
    get_in = getattr(model, "get_input_embeddings", None)
    if non_embedding and callable(get_in):
        emb = get_in()
        get_out = getattr(model, "get_output_embeddings", None)
        out = get_out() if callable(get_out) else None
        if emb is not None and (out is None or out.weight is not emb.weight) and any(p is emb.weight for p in params):
            total -= emb.weight.numel()
    return total


def train_cost(n: int, n_trained: int) -> float:
    """FLOPs per token of a forward and its backward through `n` parameters of which `n_trained` are trained:
    2·n + 2·n (the input gradients) + 2·n_trained (the weight gradients); 6·n when all are."""
    return 4.0 * n + 2.0 * n_trained


def computed_tokens(args: tuple, kwargs: dict) -> int | torch.Tensor:
    """Positions a causal-LM forward computes: its new input positions that are not padding.

    Read from the attention mask it is a 0-dim tensor on the mask's device, not synchronised (a GPU
    run does not wait on every forward, decoding steps included); else an int.
    """
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    shape = ids.shape if ids is not None else embeds.shape[:2] if embeds is not None else None
    if shape is None:
        return 0
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask[:, -shape[-1]:].sum()  # with a KV cache the mask covers past + new positions
    return int(torch.Size(shape).numel())


def head_positions(args: tuple, kwargs: dict, tokens: int | torch.Tensor) -> int | torch.Tensor:
    """Positions at which a forward computes logits: its ``logits_to_keep`` (last n, or an index tensor)
    among its non-padded new positions; all of them (`tokens`) without it."""
    keep = kwargs.get("logits_to_keep")
    if keep is None or (isinstance(keep, int) and keep == 0):
        return tokens
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs["inputs_embeds"][..., 0]
    B, T = ids.shape[:2]
    mask = kwargs.get("attention_mask")
    real = mask[:, -T:] if isinstance(mask, torch.Tensor) and mask.dim() == 2 else ids.new_ones(B, T)
    return real[:, -keep:].sum() if isinstance(keep, int) else real[:, keep.to(real.device)].sum()


def head_parameters(model: torch.nn.Module, *, trainable: bool = False) -> int:
    """Parameters (weight and bias) of a model's output head, or of `model` itself when it is a linear
    head (a peft wrapper of one: its copy that runs); 0 for a model without one. With `trainable`, only
    those that require gradients."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else model if hasattr(model, "weight") else None
    if head is None:
        return 0
    return sum(p.numel() for p in (head.weight, getattr(head, "bias", None))
               if p is not None and (p.requires_grad or not trainable))


class FlopMeter:
    """Cumulative FLOPs of a run, by the rule of the module docstring.

    Forwards add their counts as pending tensors; reading `train` or `other` sums them (one
    synchronisation per read, e.g. per logged step, not per forward).
    """

    def __init__(self, train: float = 0.0, other: float = 0.0) -> None:
        self._totals = {"train": float(train), "other": float(other)}
        self._pending: dict[str, list[tuple[float, int | torch.Tensor]]] = {"train": [], "other": []}
        self._handles: list = []

    def _read(self, kind: str) -> float:
        pending = self._pending[kind]
        if pending:
            self._totals[kind] += sum(per_token * int(tokens) for per_token, tokens in pending)
            pending.clear()
        return self._totals[kind]

    def _write(self, kind: str, value: float) -> None:
        self._pending[kind].clear()
        self._totals[kind] = float(value)

    train = property(lambda self: self._read("train"), lambda self, v: self._write("train", v),
                     doc="4·N + 2·N_trained per token of forwards with gradient through trainable parameters.")
    other = property(lambda self: self._read("other"), lambda self, v: self._write("other", v),
                     doc="2·N per token of every other forward.")

    @property
    def total(self) -> float:
        return self.train + self.other

    def add(self, kind: str, per_token: float, tokens: int | torch.Tensor) -> None:
        """Count `per_token` FLOPs for each of `tokens` under `kind` ("train" or "other"): compute that runs
        outside a hooked forward (a head applied by the loss)."""
        self._pending[kind].append((per_token, tokens))

    def attach(self, model: torch.nn.Module) -> None:
        """Count every forward of `model` from now on (N: its non-embedding parameters, N_trained: those of them
        that require gradients now)."""
        n, n_trained = count_parameters(model), count_parameters(model, trainable=True)
        n_head = min(head_parameters(model), n)
        h_trained = min(head_parameters(model, trainable=True), n_trained)

        # A deep copy of `model` (DPO's frozen reference) inherits this hook: it counts as the copy is, frozen.
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            tokens = computed_tokens(args, kwargs)
            heads = head_positions(args, kwargs, tokens)
            if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
                kind, body, head = "train", train_cost(n - n_head, n_trained - h_trained), train_cost(n_head, h_trained)
            else:
                kind, body, head = "other", 2.0 * (n - n_head), 2.0 * n_head
            self._pending[kind].append((body, tokens))
            self._pending[kind].append((head, heads))

        self._handles.append(model.register_forward_pre_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        """Stop counting (remove the hooks)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
