"""Cut a teacher into a smaller model: depth (drop decoder layers) and width (MLP channels, attention heads).

The output is a plain Hugging Face directory (written by :func:`lmdistill.models.save_model`) that
``AutoModelForCausalLM.from_pretrained`` loads without lmdistill, plus ``prune.json`` saying what
was kept and the scores it was chosen by. Layouts: Llama and Qwen2 (q/k/v biases are sliced with
their rows); tied embeddings stay tied.

Importance is measured on calibration rows with forward hooks:

- a layer's block influence (ShortGPT): 1 - mean cosine(input, output) of its hidden states over
  non-padded tokens; the lowest is the layer that changes its input least;
- an MLP channel's score (Minitron): mean |act(gate(x)) * up(x)| (the input of ``down_proj``) over
  non-padded tokens;
- a head's score (Minitron): the L2 norm of the head's slice of ``o_proj``'s input, summed over
  non-padded tokens. With grouped-query attention a KV group is kept or cut whole (its score: the
  sum of its query heads'), so ``num_key_value_heads`` shrinks with ``num_attention_heads`` and
  heads per group stay as they were.

Each layer keeps its own best channels / heads; the count is the same in every layer (one config).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from lmdistill.config import ConfigError, PruneConfig, RunConfig
from lmdistill.data import collate, encode_rows, load_rows
from lmdistill.flops import count_parameters
from lmdistill.io import atomic_write_text
from lmdistill.models import load_model, load_tokenizer, save_model

LAYOUTS = ("llama", "qwen2")
PRUNE_JSON = "prune.json"


@dataclass
class Importance:
    """Scores measured on calibration tokens, per decoder layer of the unpruned model."""

    block_influence: list[float]
    """1 - mean cosine(input, output) of each layer's hidden states."""
    mlp: list[torch.Tensor] = field(default_factory=list)
    """Per layer, (intermediate_size,): mean |input of down_proj| per channel."""
    heads: list[torch.Tensor] = field(default_factory=list)
    """Per layer, (num_attention_heads,): Σ_tokens ‖head's slice of o_proj's input‖₂."""


@dataclass
class PruneResult:
    """What :func:`prune_teacher` wrote."""

    directory: Path
    layers: list[int]
    intermediate_size: int
    num_heads: int
    num_key_value_heads: int
    params_before: int
    params_after: int


def _check_layout(model: PreTrainedModel) -> None:
    if model.config.model_type not in LAYOUTS:
        raise ConfigError(f"prune: model type {model.config.model_type!r} is not supported (supported: {', '.join(LAYOUTS)})")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def measure_importance(model: PreTrainedModel, batches: Iterable[dict[str, torch.Tensor]]) -> Importance:
    """Block influence, MLP-channel and head scores of `model` over `batches` (input_ids, attention_mask: (B, T))."""
    _check_layout(model)
    layers = model.model.layers
    n_heads, head_dim = model.config.num_attention_heads, _head_dim(model.config)
    cos_sum = torch.zeros(len(layers), dtype=torch.float64)
    mlp_sum = [torch.zeros(model.config.intermediate_size, dtype=torch.float64) for _ in layers]
    head_sum = [torch.zeros(n_heads, dtype=torch.float64) for _ in layers]
    state: dict = {}  # the current batch's token mask, (B, T) bool

    def layer_hook(i):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            x, m = _hidden_in(args, kwargs)[state["mask"]], state["mask"]
            y = out[m]
            cos_sum[i] += torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1).sum().cpu()
        return hook

    def down_hook(i):
        def hook(module, args, output):
            mlp_sum[i] += args[0][state["mask"]].abs().double().sum(0).cpu()
        return hook

    def o_hook(i):
        def hook(module, args, output):
            a = args[0][state["mask"]].double()  # (tokens, H * D)
            head_sum[i] += a.view(a.shape[0], n_heads, head_dim).norm(dim=-1).sum(0).cpu()
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(layer_hook(i), with_kwargs=True))
        handles.append(layer.mlp.down_proj.register_forward_hook(down_hook(i)))
        handles.append(layer.self_attn.o_proj.register_forward_hook(o_hook(i)))
    was_training = model.training
    model.eval()
    tokens = 0
    device = next(model.parameters()).device
    try:
        for batch in batches:
            mask = batch["attention_mask"].bool().to(device)
            state["mask"] = mask
            model(input_ids=batch["input_ids"].to(device), attention_mask=mask.long(), use_cache=False)
            tokens += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if tokens == 0:
        raise ConfigError("prune: the calibration rows have no tokens")
    return Importance(block_influence=(1 - cos_sum / tokens).tolist(),
                      mlp=[s / tokens for s in mlp_sum], heads=head_sum)


def choose_layers(cfg: PruneConfig, n_layers: int, block_influence: list[float] | None = None) -> list[int]:
    """Indices of the layers kept, ascending, by the one depth rule `cfg` sets (all when none)."""
    if cfg.layers is not None:
        bad = [i for i in cfg.layers if i >= n_layers]
        if bad:
            raise ConfigError(f"prune.layers: the model has {n_layers} layers (0..{n_layers - 1}), got {bad}")
        return sorted(cfg.layers)
    if cfg.drop_every:
        return [i for i in range(n_layers) if i % cfg.drop_every != cfg.drop_every - 1]
    if cfg.drop_block:
        start, end = cfg.drop_block
        if end > n_layers or end - start >= n_layers:
            raise ConfigError(f"prune.drop_block: [{start}, {end}) must leave at least one of the model's {n_layers} layers")
        return [i for i in range(n_layers) if not start <= i < end]
    if cfg.n_layers:
        if cfg.n_layers > n_layers:
            raise ConfigError(f"prune.n_layers={cfg.n_layers}: the model has {n_layers} layers")
        assert block_influence is not None
        order = sorted(range(n_layers), key=lambda i: (-block_influence[i], i))
        return sorted(order[: cfg.n_layers])
    return list(range(n_layers))


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, ascending (ties: the lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def _slice_linear(sd: dict, name: str, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    w = sd[f"{name}.weight"]
    if rows is not None:
        w = w.index_select(0, rows)
        if f"{name}.bias" in sd:
            sd[f"{name}.bias"] = sd[f"{name}.bias"].index_select(0, rows).clone()
    if cols is not None:
        w = w.index_select(1, cols)
    sd[f"{name}.weight"] = w.clone()


def check_width(config, intermediate_size: int = 0, num_heads: int = 0) -> tuple[int, int]:
    """(intermediate_size, num_heads) a model of `config` is cut to (0: as it is); a ConfigError if it cannot be."""
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    group = n_heads // n_kv
    inter, heads = intermediate_size or config.intermediate_size, num_heads or n_heads
    if inter > config.intermediate_size:
        raise ConfigError(f"prune.intermediate_size={inter}: the model has {config.intermediate_size}")
    if heads > n_heads or heads % group:
        raise ConfigError(f"prune.num_heads={heads}: must be at most {n_heads} and a multiple of {group} "
                          f"(heads per KV group: {n_heads} heads share {n_kv} KV heads; whole groups are cut)")
    return inter, heads


def prune_model(model: PreTrainedModel, layers: list[int] | None = None, intermediate_size: int = 0,
                num_heads: int = 0, importance: Importance | None = None) -> tuple[PreTrainedModel, dict]:
    """A new model: `model` with only `layers` (default: all), `intermediate_size` MLP channels and
    `num_heads` attention heads per layer (0: all), chosen by `importance` (needed for width pruning).

    Returns (model, record): the record lists what was kept (indices into the unpruned model).
    """
    _check_layout(model)
    config = model.config
    n_layers = config.num_hidden_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    group, head_dim = n_heads // n_kv, _head_dim(config)
    inter, heads = check_width(config, intermediate_size, num_heads)
    width = inter < config.intermediate_size or heads < n_heads
    if width and importance is None:
        raise ValueError("width pruning needs importance scores (measure_importance)")

    old = model.state_dict()
    sd: dict[str, torch.Tensor] = {k: v for k, v in old.items() if not k.startswith("model.layers.")}
    record: dict = {"layers": layers, "mlp_channels": {}, "kv_groups": {}}
    for new_i, old_i in enumerate(layers):
        src, dst = f"model.layers.{old_i}.", f"model.layers.{new_i}."
        for k, v in old.items():
            if k.startswith(src):
                sd[dst + k[len(src):]] = v
        if inter < config.intermediate_size:
            keep = _top(importance.mlp[old_i], inter)
            for proj in ("gate_proj", "up_proj"):
                _slice_linear(sd, f"{dst}mlp.{proj}", rows=keep)
            _slice_linear(sd, f"{dst}mlp.down_proj", cols=keep)
            record["mlp_channels"][str(old_i)] = keep.tolist()
        if heads < n_heads:
            group_scores = importance.heads[old_i].view(n_kv, group).sum(-1)
            groups = _top(group_scores, heads // group)
            kv_rows = (groups[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
            q_heads = (groups[:, None] * group + torch.arange(group)).reshape(-1)
            q_rows = (q_heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
            _slice_linear(sd, f"{dst}self_attn.q_proj", rows=q_rows)
            for proj in ("k_proj", "v_proj"):
                _slice_linear(sd, f"{dst}self_attn.{proj}", rows=kv_rows)
            _slice_linear(sd, f"{dst}self_attn.o_proj", cols=q_rows)
            record["kv_groups"][str(old_i)] = groups.tolist()

    new_config = config.__class__.from_dict(config.to_dict())
    new_config.num_hidden_layers = len(layers)
    new_config.intermediate_size = inter
    new_config.num_attention_heads = heads
    new_config.num_key_value_heads = heads // group
    new_config.head_dim = head_dim  # no longer hidden_size / heads once heads are cut
    if getattr(new_config, "layer_types", None):
        new_config.layer_types = [config.layer_types[i] for i in layers]
    if getattr(new_config, "max_window_layers", None) is not None:
        new_config.max_window_layers = min(new_config.max_window_layers, len(layers))
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        pruned = AutoModelForCausalLM.from_config(new_config, dtype=dtype)
    pruned.load_state_dict(sd, strict=True, assign=True)
    if config.tie_word_embeddings:
        pruned.tie_weights()
    device = next(model.parameters()).device
    # Non-persistent buffers (rotary inv_freq) are not in the state dict: rebuild them off the meta device.
    pruned.model.rotary_emb = type(model.model.rotary_emb)(config=new_config)
    pruned.to(device)
    if model.generation_config is not None:
        pruned.generation_config = model.generation_config
    pruned.eval()
    return pruned, record


def calibration_batches(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> list[dict[str, torch.Tensor]]:
    """The first `prune.calibration_rows` training rows of the `data` section, tokenized and batched."""
    rows = load_rows(cfg.data)[0][: cfg.prune.calibration_rows]
    encoded = encode_rows(tokenizer, rows, max_length=cfg.data.max_length, truncation=cfg.data.truncation,
                          system_prompt=cfg.data.system_prompt)
    n = cfg.prune.batch_size
    return [collate(encoded[i:i + n], tokenizer.pad_token_id) for i in range(0, len(encoded), n)]


def _needs_importance(p: PruneConfig) -> bool:
    return bool(p.n_layers or p.intermediate_size or p.num_heads)


def prune_teacher(cfg: RunConfig, output: Path | None = None) -> PruneResult:
    """Prune `teacher.model` as the `prune` section says and write it (default: `prune.output`, else
    <run_dir>/pruned) with `prune.json`; calibration rows are the `data` section's training rows."""
    p = cfg.prune
    if cfg.teacher.model.path is None:
        raise ConfigError("prune: teacher.model.path is the model to prune; it is not set")
    directory = Path(output or p.output or cfg.run_dir / "pruned")
    tokenizer = load_tokenizer(cfg.teacher.model)
    teacher = load_model(cfg.teacher.model, tokenizer)
    _check_layout(teacher)
    check_width(teacher.config, p.intermediate_size, p.num_heads)  # before minutes of calibration
    if not p.n_layers:
        choose_layers(p, teacher.config.num_hidden_layers)
    importance = measure_importance(teacher, calibration_batches(cfg, tokenizer)) if _needs_importance(p) else None
    layers = choose_layers(p, teacher.config.num_hidden_layers, importance.block_influence if importance else None)
    pruned, record = prune_model(teacher, layers, p.intermediate_size, p.num_heads, importance)
    save_model(pruned, tokenizer, directory)
    n_before, n_after = count_parameters(teacher, non_embedding=False), count_parameters(pruned, non_embedding=False)
    c, pc = teacher.config, pruned.config
    summary = {
        "teacher": cfg.teacher.model.path,
        "prune": {k: v for k, v in vars(p).items()},
        "params": {"before": n_before, "after": n_after},  # all, tied weights once
        "num_hidden_layers": {"before": c.num_hidden_layers, "after": pc.num_hidden_layers},
        "intermediate_size": {"before": c.intermediate_size, "after": pc.intermediate_size},
        "num_attention_heads": {"before": c.num_attention_heads, "after": pc.num_attention_heads},
        "num_key_value_heads": {"before": c.num_key_value_heads, "after": pc.num_key_value_heads},
        "layers_kept": layers,
        "layers_dropped": [i for i in range(c.num_hidden_layers) if i not in layers],
        "mlp_channels_kept": record["mlp_channels"],
        "kv_groups_kept": record["kv_groups"],
        "scores": None if importance is None else {
            "block_influence": importance.block_influence,
            "heads": [[round(float(x), 6) for x in h] for h in importance.heads],
            "mlp": [[round(float(x), 6) for x in m] for m in importance.mlp] if p.intermediate_size else None,
        },
    }
    atomic_write_text(directory / PRUNE_JSON, json.dumps(summary, indent=1) + "\n")  # reuse is keyed on it
    return PruneResult(directory, layers, pc.intermediate_size, pc.num_attention_heads, pc.num_key_value_heads,
                       n_before, n_after)


def student_init(cfg: RunConfig) -> Path:
    """<run_dir>/student_init: the teacher pruned by the run's `prune` section, written once and reused."""
    directory = cfg.run_dir / "student_init"
    if not (directory / PRUNE_JSON).exists():
        prune_teacher(cfg, directory)
    return directory
