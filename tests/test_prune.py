"""Pruning a teacher into a student: depth and width, importance scores, the saved directory, CLI, init_from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lmdistill.cli import main
from lmdistill.config import ConfigError, PruneConfig
from lmdistill.flops import count_parameters
from lmdistill.evaluate.run import evaluate_run
from lmdistill.models import build_char_tokenizer, save_model
from lmdistill.prune import choose_layers, measure_importance, prune_model
from lmdistill.train import fit
from conftest import read_metrics, tiny_run_config

TOK = build_char_tokenizer()


def llama(n_layers: int = 4, heads: int = 4, kv: int = 4, inter: int = 48, tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(TOK), hidden_size=32, intermediate_size=inter, num_hidden_layers=n_layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64,
                      tie_word_embeddings=tied, pad_token_id=TOK.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


def qwen2(tied: bool = False) -> Qwen2ForCausalLM:
    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=len(TOK), hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied, pad_token_id=TOK.pad_token_id)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-zero q/k/v biases, so slicing them matters
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


def batch(texts=("What is 12 + 30? 42", "7 * 6 = 42", "gcd(12, 18)")) -> dict[str, torch.Tensor]:
    enc = TOK(list(texts), padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def logits(model, b) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits


@pytest.mark.parametrize("make", [llama, qwen2, lambda: llama(kv=2, tied=False)])
def test_pruning_nothing_reproduces_the_teacher_exactly(make):
    model, b = make(), batch()
    pruned, record = prune_model(model)
    assert torch.equal(logits(pruned, b), logits(model, b))
    assert record["layers"] == [0, 1, 2, 3]


def test_pruned_model_has_asked_sizes_and_loads_in_plain_transformers(tmp_path: Path):
    model, b = llama(kv=2), batch()
    imp = measure_importance(model, [b])
    pruned, _ = prune_model(model, layers=[0, 2, 3], intermediate_size=24, num_heads=2, importance=imp)
    c = pruned.config
    assert (c.num_hidden_layers, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) \
        == (3, 24, 2, 1, 8)
    assert pruned.model.layers[0].mlp.down_proj.weight.shape == (32, 24)
    assert pruned.model.layers[0].self_attn.q_proj.weight.shape == (16, 32)
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight
    save_model(pruned, TOK, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.num_hidden_layers == 3 and loaded.config.intermediate_size == 24
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits(loaded, b), logits(pruned, b), rtol=0, atol=0)


def test_depth_only_keeps_the_kept_layers_weights():
    model, b = llama(), batch()
    pruned, _ = prune_model(model, layers=[1, 3])
    assert pruned.generate(b["input_ids"][:1], max_new_tokens=3, do_sample=False).shape == (1, b["input_ids"].shape[1] + 3)
    assert torch.equal(pruned.model.layers[1].mlp.up_proj.weight, model.model.layers[3].mlp.up_proj.weight)
    # The same as running the teacher with layers 0 and 2 skipped.
    model.model.layers = torch.nn.ModuleList([model.model.layers[1], model.model.layers[3]])
    model.config.num_hidden_layers = 2
    assert torch.equal(logits(pruned, b), logits(model, b))


def test_identity_layer_scores_lowest_and_is_dropped():
    model, b = llama(), batch()
    with torch.no_grad():  # layer 2 passes the residual through unchanged
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    imp = measure_importance(model, [b])
    assert min(range(4), key=lambda i: imp.block_influence[i]) == 2
    assert abs(imp.block_influence[2]) < 1e-9
    assert choose_layers(PruneConfig(n_layers=3), 4, imp.block_influence) == [0, 1, 3]


def test_zeroed_mlp_channel_and_head_are_pruned_first():
    model, b = llama(), batch()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[5].zero_()
            layer.mlp.up_proj.weight[5].zero_()
            layer.self_attn.v_proj.weight[8:16].zero_()  # head 1 (head_dim 8) outputs zeros
    imp = measure_importance(model, [b])
    for scores in imp.mlp:
        assert int(scores.argmin()) == 5 and float(scores[5]) == 0.0
    for scores in imp.heads:
        assert int(scores.argmin()) == 1
    _, record = prune_model(model, intermediate_size=47, num_heads=3, importance=imp)
    assert all(5 not in kept and len(kept) == 47 for kept in record["mlp_channels"].values())
    assert all(kept == [0, 2, 3] for kept in record["kv_groups"].values())


def test_qwen2_with_biases_and_gqa_prunes_and_loads(tmp_path: Path):
    model, b = qwen2(), batch()
    imp = measure_importance(model, [b])
    pruned, record = prune_model(model, layers=[0, 1, 3], intermediate_size=32, num_heads=2, importance=imp)
    attn = pruned.model.layers[0].self_attn
    assert attn.q_proj.bias.shape == (16,) and attn.k_proj.bias.shape == (8,) and attn.v_proj.bias.shape == (8,)
    g = record["kv_groups"]["0"][0]
    assert torch.equal(attn.k_proj.bias, model.model.layers[0].self_attn.k_proj.bias[g * 8:(g + 1) * 8])
    assert pruned.config.num_key_value_heads == 1 and len(pruned.config.layer_types) == 3
    save_model(pruned, TOK, tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert loaded.config.model_type == "qwen2"
    assert torch.equal(logits(loaded, b), logits(pruned, b))
    with pytest.raises(ConfigError, match="multiple of 2"):
        prune_model(model, num_heads=3, importance=imp)


def test_prune_config_rejects_two_depth_rules():
    with pytest.raises(ConfigError, match="at most one depth rule"):
        PruneConfig(drop_every=2, n_layers=2)
    assert choose_layers(PruneConfig(drop_every=2), 5) == [0, 2, 4]
    assert choose_layers(PruneConfig(drop_block=[1, 3]), 5) == [0, 3, 4]


def _write_config(tmp_path: Path, teacher: Path, data: Path) -> Path:
    cfg = tmp_path / "prune.yaml"
    cfg.write_text(f"teacher:\n  model:\n    path: {teacher}\n"
                   f"data:\n  source: jsonl\n  train_path: {data}\n  max_length: 40\n"
                   f"prune:\n  calibration_rows: 16\n  output: {tmp_path / 'out'}\n")
    return cfg


def test_cli_prune_end_to_end(tmp_path: Path, addition_data: Path, capsys):
    save_model(llama(), TOK, tmp_path / "teacher")
    cfg = _write_config(tmp_path, tmp_path / "teacher", addition_data)
    assert main(["prune", str(cfg), "prune.n_layers=2", "prune.intermediate_size=16"]) == 0
    out = capsys.readouterr().out
    assert "layers kept (2)" in out and str(tmp_path / "out") in out
    summary = json.loads((tmp_path / "out" / "prune.json").read_text())
    assert len(summary["layers_kept"]) == 2 and summary["intermediate_size"]["after"] == 16
    assert len(summary["scores"]["block_influence"]) == 4
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.config.num_hidden_layers == 2
    assert (tmp_path / "out" / "tokenizer.json").exists()


def test_cli_prune_bad_key_is_one_line_exit_2(tmp_path: Path, addition_data: Path, capsys):
    cfg = _write_config(tmp_path, tmp_path / "teacher", addition_data)
    assert main(["prune", str(cfg), "prune.n_layer=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "prune.n_layer" in err and "n_layers" in err
    assert main(["prune", str(cfg), "prune.n_layers=2"]) == 2  # no teacher at that path
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err
    save_model(llama(), TOK, tmp_path / "teacher")  # an impossible width is refused before any calibration data is read
    assert main(["prune", str(cfg), "prune.num_heads=5", "data.train_path=/nonexistent.jsonl"]) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("lmdistill")]  # the rest: transformers' loading bar
    assert len(errors) == 1 and "prune.num_heads=5" in errors[0] and "at most 4" in errors[0]


def test_student_init_from_teacher_trains(data: Path, teacher_dir: Path, tmp_path: Path):
    cfg = tiny_run_config(data, tmp_path / "run", student={"init_from": "teacher", "tokenizer": None},
                          teacher={"kind": "local", "model": {"path": str(teacher_dir)}},
                          method={"name": "kd"}, prune={"layers": [1], "intermediate_size": 64},
                          train={"steps": 2})
    result = fit(cfg, progress=False)
    assert result.step == 2
    init = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student_init")
    assert init.config.num_hidden_layers == 1 and init.config.intermediate_size == 64
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert trained.config.num_hidden_layers == 1
    assert len(read_metrics(tmp_path / "run")) >= 1
    ev = evaluate_run(result.run_dir)  # its config.yaml loads back
    assert ev["params_non_embedding"] == count_parameters(trained) < ev["teacher"]["params_non_embedding"]
