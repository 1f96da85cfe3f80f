"""Data: rows from files, errors naming file/line/field, response-only labels, truncation."""

import json

import pytest

from lmdistill.config import DataConfig
from lmdistill.data import IGNORE_INDEX, DataError, collate, encode_row, load_rows
from lmdistill.data.rows import read_jsonl
from lmdistill.data.tokenize import render_prompt, response_token_count
from lmdistill.models import build_char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def write(path, lines):
    path.write_text("".join(l + "\n" for l in lines))
    return path


def test_dolly_and_plain_rows(tmp_path):
    p = write(tmp_path / "d.jsonl", [
        json.dumps({"instruction": "Summarise.", "context": "Long text.", "response": "Short."}),
        json.dumps({"instruction": "Say hi.", "context": "", "response": "Hi."}),
        json.dumps({"prompt": "2+2?", "response": "4", "id": "mine", "rationale": "two and two"}),
    ])
    rows = read_jsonl(p)
    assert rows[0]["prompt"] == "Summarise.\n\nLong text." and rows[0]["response"] == "Short."
    assert rows[1]["prompt"] == "Say hi."
    assert rows[2]["id"] == "mine" and rows[2]["rationale"] == "two and two"
    assert rows[0]["id"] == "d-1"


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "x", "response": "y"', r"d.jsonl:2: invalid JSON"),
        ('{"prompt": "x"}', r"d.jsonl:2: missing field 'response'"),
        ('{"response": "x"}', r"d.jsonl:2: missing field 'prompt'"),
        ('{"prompt": "x", "response": "  "}', r"d.jsonl:2: field 'response' is empty"),
        ('{"instruction": "", "response": "y"}', r"d.jsonl:2: field 'instruction' is empty"),
        ('{"prompt": 3, "response": "y"}', r"d.jsonl:2: field 'prompt' must be a string"),
        ('[1, 2]', r"d.jsonl:2: expected a JSON object"),
    ],
)
def test_bad_rows_name_file_line_field(tmp_path, line, message):
    p = write(tmp_path / "d.jsonl", ['{"prompt": "ok", "response": "fine"}', line])
    with pytest.raises(DataError, match=message):
        read_jsonl(p)


def test_prompt_over_limit_names_row(tmp_path, tok):
    p = write(tmp_path / "d.jsonl", [json.dumps({"prompt": "x" * 50, "response": "y"})])
    row = read_jsonl(p)[0]
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'prompt' is 52 tokens, over data.max_length=20"):
        encode_row(tok, row, max_length=20)


def test_labels_mask_prompt_and_padding(tok):
    short = encode_row(tok, {"prompt": "1+1", "response": "2"}, max_length=32)
    long = encode_row(tok, {"prompt": "10+10", "response": "20"}, max_length=32)
    # plain format: <bos> + "1+1\n" is the prompt; "2" + <eos> the response
    assert short.n_prompt == 1 + len("1+1\n")
    assert tok.decode(short.input_ids[short.n_prompt:], skip_special_tokens=True) == "2"
    assert short.input_ids[-1] == tok.eos_token_id
    batch = collate([short, long], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, len(long.input_ids))
    labels = batch["labels"]
    assert (labels[0, : short.n_prompt] == IGNORE_INDEX).all()
    assert (labels[0, len(short.input_ids):] == IGNORE_INDEX).all()  # padding
    assert labels[0, short.n_prompt] == short.input_ids[short.n_prompt]
    assert batch["attention_mask"][0].sum() == len(short.input_ids)
    assert response_token_count(labels) == 2 + 3  # "2"+eos, "20"+eos


def test_truncation_policies(tok):
    row = {"prompt": "abc", "response": "x" * 40, "_where": "f.jsonl:7"}
    enc = encode_row(tok, row, max_length=20, truncation="response")
    assert len(enc.input_ids) == 20 and enc.n_prompt == 5
    with pytest.raises(DataError, match=r"f.jsonl:7: field 'response' makes the row 46 tokens"):
        encode_row(tok, row, max_length=20, truncation="error")


def test_chat_template_is_used_when_present(tok):
    tok = build_char_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert render_prompt(tok, "hi", "be brief") == "<system>be brief\n<user>hi\n<assistant>"
    enc = encode_row(tok, {"prompt": "hi", "response": "yo"}, max_length=64, system_prompt="be brief")
    assert tok.decode(enc.input_ids[: enc.n_prompt]) == "<system>be brief\n<user>hi\n<assistant>"
    assert tok.decode(enc.input_ids[enc.n_prompt:]) == "yo\n"


def test_load_rows_splits_and_checks_ids(tmp_path):
    p = write(tmp_path / "d.jsonl", [json.dumps({"prompt": f"q{i}", "response": "a"}) for i in range(40)])
    train, held = load_rows(DataConfig(source="jsonl", train_path=str(p), eval_fraction=0.25))
    assert len(held) == 10 and len(train) == 30
    assert not {r["id"] for r in train} & {r["id"] for r in held}
    dup = write(tmp_path / "dup.jsonl", [json.dumps({"prompt": "q", "response": "a", "id": "z"})] * 2)
    with pytest.raises(DataError, match=r"dup.jsonl:2: duplicate id 'z'"):
        load_rows(DataConfig(source="jsonl", train_path=str(dup), eval_path=str(p)))


def test_math_rows_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LMDISTILL_CACHE", str(tmp_path))
    cfg = DataConfig(source="math", n_train=12, n_eval=4, math_modules=["numbers__gcd"])
    first = load_rows(cfg)
    assert len(list((tmp_path / "math").glob("*.jsonl"))) == 2
    assert load_rows(cfg) == first
    assert {r["prompt"] for r in first[0]}.isdisjoint(r["prompt"] for r in first[1])
