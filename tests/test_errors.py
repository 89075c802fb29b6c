"""Issue 15: every bad input and broken file is one `error:` line and exit code 2 (no traceback), and the
run directory's good files stay as they were; a damaged newest checkpoint falls back to the one before."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import cli
import eval as ev
import sample
import train_r3
from conftest import ROOT


def fails_with_one_line(main, argv, capsys, monkeypatch=None) -> str:
    """Run a command's main in-process through cli.run: exit code 2 and one `error:` line on stderr."""
    if monkeypatch is not None:  # sample.main reads sys.argv
        monkeypatch.setattr(sys, "argv", ["sample.py", *argv])
        call = main
    else:
        call = lambda: main(argv)  # noqa: E731
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run(call)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    # Model loading may draw a progress bar on stderr first (transformers'); the error is the one last line.
    lines = err.strip().split("\n")
    assert lines[-1].startswith("error:") and sum("error" in line for line in lines) == 1, err
    assert "Traceback" not in err and all("\r" in line for line in lines[:-1]), err
    return lines[-1]


def snapshot(run_dir) -> dict:
    """Every file of a run directory and its bytes (the lock file aside: it only records who holds it)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def train_args(model_dir, out_dir, *extra):
    return ["--model", str(model_dir), "--task", "countdown", "--method", "grpo", "--train-size", "6",
            "--eval-size", "2", "--max-new-tokens", "4", "--group-size", "2", "--batch-size", "2", "--lora-r", "4",
            "--eval-every", "0", "--save-every", "1", "--out-dir", str(out_dir), *extra]


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """A 2-step run with a checkpoint after each step (ckpt-000001, ckpt-000002)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train_r3.main(train_args(tiny_model_dir, run, "--steps", "2"))
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy, ignore=shutil.ignore_patterns(".lock"))
    return copy


def steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- flags

@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps must be at least 1"), (["--steps", "-1"], "--steps"),
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "-1"], "--batch-size"),
    (["--group-size", "0"], "--group-size"), (["--group-size", "1"], "--group-size"),
    (["--temperature", "0"], "--temperature"), (["--temperature", "-1"], "--temperature"),
    (["--lr", "-1"], "--lr must be > 0"), (["--lr", "nan"], "--lr"),
    (["--max-new-tokens", "0"], "--max-new-tokens"), (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--save-every", "0"], "--save-every"), (["--micro-batch", "0"], "--micro-batch"),
    (["--updates-per-batch", "0"], "--updates-per-batch"), (["--reflect-tokens", "0"], "--reflect-tokens"),
    (["--lora-r", "0"], "--lora-r"), (["--train-size", "0"], "--train-size"), (["--eval-every", "-1"], "--eval-every"),
    (["--method", "score", "--beta1", "-1"], "--beta1"), (["--method", "rerest", "--k", "0"], "--k"),
    (["--steps", "1"], "beyond --steps 1"),  # the checkpoint is at step 2: nothing would be trained
    (["--lora-r", "8"], "--lora-r 4"), (["--model", "OTHER"], "--model"),  # --resume with another model/LoRA
    (["--warmup-steps", "-1"], "--warmup-steps"), (["--refresh-failures", "-1"], "--refresh-failures"),
    (["--token-budget", "-5"], "--token-budget"), (["--init-adapter", "/no/such/run"], "no adapter at"),
    (["--method", "r3", "--warmup-steps", "3", "--steps", "3"], "leaves no R3 step"),
    (["--warmup-steps", "2"], "are R3's"),  # the finished run is GRPO's
    (["--repeat-reward", "0"], "--repeat-reward is R3's"), (["--method", "r3", "--repeat-reward", "2"], "at most 1"),
    (["--method", "r3", "--repeat-reward", "inf"], "--repeat-reward must be a finite"),
    (["--method", "r3", "--repeat-reward", "nan"], "--repeat-reward must be a finite"),
    (["--repeat-advantage", "-0.5"], "--repeat-advantage and --reflect-prompt are R3's"),
    (["--method", "r3", "--repeat-advantage", "0.5"], "--repeat-advantage must be at most 0"),
    (["--method", "r3", "--repeat-advantage", "nan"], "--repeat-advantage must be a finite"),
    (["--retry-reward", "progress"], "--reflect-prompt are R3's"), (["--train-attempts"], "--reflect-prompt are R3's"),
    (["--reflect-prompt", "candidate"], "--reflect-prompt are R3's"),
    (["--retry-context", "reflection"], "--reflect-prompt are R3's"), (["--train-retries"], "--reflect-prompt are R3's"), (["--retry-context", "none"], "--retry-context"),
    (["--method", "r3", "--steps", "4", "--warmup-steps", "1"], "--warmup-steps 0"),  # a run's phases stay
    (["--solvable-k", "2"], "--failure-credit are R3's"), (["--failure-credit", "0.5"], "--failure-credit are R3's"),
    (["--method", "r3", "--failure-credit", "1"], "--failure-credit must be below 1"),
    (["--method", "r3", "--failure-credit", "-0.5"], "--failure-credit must be >= 0"),
    (["--method", "r3", "--failure-credit", "nan"], "--failure-credit must be a finite"),
    (["--method", "r3", "--steps", "4", "--failure-credit", "0.5"], "--failure-credit 0.0"),  # its failure set stays
    (["--method", "r3", "--solvable-k", "-1"], "--solvable-k"),
    (["--method", "r3", "--solvable-k", "1"], "--solvable-k must be 0 (off) or at least 2"),
    (["--method", "r3", "--steps", "4", "--solvable-k", "2"], "--solvable-k 0"),  # its failure set stays
])
def test_train_flags(flags, message, finished_run, tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns(".lock"))
    if "OTHER" in flags:  # the same model under another name: only args.json can tell
        other = tmp_path / "other-model"
        shutil.copytree(tiny_model_dir, other)
        flags = ["--model", str(other)]
    before = snapshot(run)
    argv = train_args(tiny_model_dir, run, "--resume") + flags
    assert message in fails_with_one_line(train_r3.main, argv, capsys)
    assert snapshot(run) == before


@pytest.mark.parametrize("passes, flags, message", [
    (True, [], "every first attempt passed: no failures to learn from (try a harder --source)"),
    (True, ["--solvable-k", "2"], "no query both failed and passed in --solvable-k 2 samples"),
    (False, ["--solvable-k", "3"], "no query both failed and passed in --solvable-k 3 samples"),
    (False, ["--failure-credit", "0.5"], "no kept query had a failed attempt with partial credit >= --failure-credit 0.5"),
])
def test_an_empty_failure_set_is_one_line(passes, flags, message, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A failure set with nothing in it (every attempt passes, or with --solvable-k none both fails and passes)."""
    import tasks
    from verifiers import Verdict
    monkeypatch.setattr(tasks, "verify", lambda task, text, ex: Verdict(passes, None if passes else "format"))
    argv = train_args(tiny_model_dir, tmp_path / "run", "--method", "r3", *flags)
    assert message in fails_with_one_line(train_r3.main, argv, capsys)


def test_train_out_dir_that_is_a_file_or_under_one(tiny_model_dir, tmp_path, capsys):
    f = tmp_path / "a-file"
    f.write_text("keep me")
    assert "not a directory" in fails_with_one_line(train_r3.main, train_args(tiny_model_dir, f), capsys)
    assert "--out-dir" in fails_with_one_line(train_r3.main, train_args(tiny_model_dir, f / "sub"), capsys)
    assert f.read_text() == "keep me"


@pytest.mark.parametrize("flags, message", [
    (["--n", "0"], "--n"), (["--batch-size", "0"], "--batch-size"), (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--temperature", "-1"], "--temperature"), (["--reflect-tokens", "-1"], "--reflect-tokens"),
    (["--method", "score", "--reflect-prompt", "candidate"], "--reflect-prompt and --retry-context are r3's"),
    (["--method", "score", "--retry-context", "reflection"], "--reflect-prompt and --retry-context are r3's"),
    (["--retry-context", "attempt"], "--retry-context"),
])
def test_eval_flags(flags, message, tiny_model_dir, tmp_path, capsys):
    argv = ["--model", str(tiny_model_dir), "--out", str(tmp_path / "evals"), *flags]
    assert message in fails_with_one_line(ev.main, argv, capsys)


def test_eval_output_paths(tiny_model_dir, tmp_path, capsys):
    f = tmp_path / "a-file"
    f.write_text("keep me")
    assert "--out" in fails_with_one_line(ev.main, ["--model", str(tiny_model_dir), "--out", str(f)], capsys)
    assert "--out" in fails_with_one_line(ev.main, ["--model", str(tiny_model_dir), "--out", str(f / "x")], capsys)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "reward": 0.5}\n')
    assert "--plot-out" in fails_with_one_line(ev.main, ["--plot", str(metrics), "--plot-out", str(f / "x.png")],
                                               capsys)
    assert "--plot-out" in fails_with_one_line(ev.main, ["--plot", str(metrics), "--plot-out", str(tmp_path)],
                                               capsys)
    assert f.read_text() == "keep me"


@pytest.mark.parametrize("flags, message", [
    (["--prompt", "hi", "--n", "0"], "--n"), (["--prompt", ""], "--prompt is empty"), (["--prompt", "  "], "--prompt"),
    (["--prompt", "hi", "--top-p", "0"], "--top-p"), (["--prompt", "hi", "--top-p", "1.5"], "--top-p"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--prompt", "hi", "--temperature", "-0.5"], "--temperature"),
    (["--prompt", "hi", "--max-new-tokens", "5000"], "context"),  # the tiny model's context is 2048
])
def test_sample_flags(flags, message, tiny_model_dir, capsys, monkeypatch):
    assert message in fails_with_one_line(sample.main, ["--model", str(tiny_model_dir), *flags], capsys, monkeypatch)


# ---------------------------------------------------------------------------------------------- data files

def _parquet(path, rows):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)


MBPP = {"text": "Add.", "code": "def add(a, b): return a + b", "test_list": ["assert add(1, 2) == 3"]}
XLAM = {"query": "Weather?", "tools": [{"name": "w"}], "answers": [{"name": "w", "arguments": {}}]}
BAD_FILES = {  # name -> (task, file name, contents: bytes, str or rows for parquet, what the line says)
    "not utf-8": ("countdown", "d.jsonl", b'{"nums": [1, 2], "target": 3}\n\xff\xfe\n', "not UTF-8"),
    "nested deep": ("math", "d.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "huge integer": ("countdown", "d.jsonl", '{"nums": [1, 2], "target": ' + "9" * 5000 + "}\n", "not usable JSON"),
    "broken parquet": ("countdown", "d.parquet", b"PAR1 not really parquet", "not a readable parquet"),
    "wrong columns": ("code", "d.parquet", [{"foo": 1}, {"foo": 2}], "expected an MBPP row"),
    "empty": ("math", "d.jsonl", "", "no math rows"),
    "blank lines": ("countdown", "d.jsonl", "\n\n", "no countdown rows"),
    "mbpp test_imports int": ("code", "d.jsonl", json.dumps({**MBPP, "test_imports": 5}), "test_imports"),
    "mbpp setup int": ("code", "d.jsonl", json.dumps({**MBPP, "test_setup_code": 7}), "test_setup_code"),
    "mbpp tests not strings": ("code", "d.jsonl", json.dumps({**MBPP, "test_list": [1]}), "test_list"),
    "xlam name int": ("function_calling", "d.jsonl", json.dumps({**XLAM, "answers": [{"name": 3}]}), "answers"),
    "xlam tools wrong": ("function_calling", "d.jsonl", json.dumps({**XLAM, "tools": "5"}), "tools"),
    "xlam no answers": ("function_calling", "d.jsonl", json.dumps({**XLAM, "answers": []}), "answers"),
    "math answer object": ("math", "d.jsonl", json.dumps({"problem": "1+1?", "answer": {"a": 2}}), "math row"),
    "countdown bool": ("countdown", "d.jsonl", json.dumps({"nums": [True, 2], "target": 3}), "countdown row"),
    "only huge rows": ("math", "d.jsonl", json.dumps({"problem": "x" * 200_000, "answer": "1"}), "longer than"),
}


@pytest.mark.parametrize("program", ["train", "eval"])
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_data_file(case, program, tiny_model_dir, tmp_path, capsys):
    task, name, contents, message = BAD_FILES[case]
    path = tmp_path / name
    if isinstance(contents, list):
        _parquet(path, contents)
    else:
        path.write_bytes(contents if isinstance(contents, bytes) else contents.encode())
    if program == "train":
        argv = train_args(tiny_model_dir, tmp_path / "run", "--task", task, "--source", str(path))
        err = fails_with_one_line(train_r3.main, argv, capsys)
        assert not (tmp_path / "run").exists()  # refused before the run directory or the model
    else:
        argv = ["--model", str(tiny_model_dir), "--task", task, "--source", str(path), "--out", str(tmp_path / "e")]
        err = fails_with_one_line(ev.main, argv, capsys)
    assert message in err and str(path) in err, err


def test_a_10_mb_row_is_skipped_with_a_count_at_load(tmp_path, capsys):
    import tasks
    rows = [{"nums": [i, 4], "target": i + 4} for i in range(1, 11)] + [{"nums": list(range(2_000_000)), "target": 1}]
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert path.stat().st_size > 10_000_000
    examples = tasks.load_examples("countdown", "train", source=str(path)) + \
        tasks.load_examples("countdown", "test", source=str(path))
    assert len(examples) == 10 and "skipped 1 row" in capsys.readouterr().out


def test_rows_longer_than_the_context_are_skipped_with_a_count(tiny_model_dir, tmp_path, capsys):
    """A row under the size cap whose prompt (3,000 numbers: ~9,000 tokens) exceeds the tiny model's 2,048
    context: skipped in training with a count; eval refuses a source where nothing fits."""
    long_row = {"nums": list(range(1, 3001)), "target": 7}
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"nums": [i, 4], "target": i + 4} for i in range(1, 9)]
                            + [long_row] * 1))
    run = tmp_path / "run"
    capsys.readouterr()
    train_r3.main(train_args(tiny_model_dir, run, "--source", str(path), "--steps", "1", "--train-size", "10"))
    out = capsys.readouterr().out
    assert "skipped 1 of" in out and "context of 2048" in out and steps(run) == [1]
    only_long = tmp_path / "only-long.jsonl"
    only_long.write_text("".join(json.dumps({**long_row, "target": t}) + "\n" for t in range(10)))
    for program, argv in [(ev.main, ["--model", str(tiny_model_dir), "--source", str(only_long), "--n", "5",
                                     "--out", str(tmp_path / "e")]),
                          (train_r3.main, train_args(tiny_model_dir, tmp_path / "run2", "--source", str(only_long)))]:
        assert "no example fits the model's context" in fails_with_one_line(program, argv, capsys)


def test_a_verifier_never_raises():
    import tasks
    bad = {"test_list": ["assert f() == 1"], "test_setup_code": 7, "test_imports": 5}  # past the load-time checks
    v = tasks.verify("code", "```python\ndef f(): return 1\n```", bad)
    assert not v.correct and v.error == "invalid_example"
    v = tasks.verify("function_calling", '[{"name": "w", "arguments": {}}]', {"answers": [{"name": 3}]})
    assert not v.correct


# ---------------------------------------------------------------------------------------------- adapters

@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """A good adapter for the tiny model, and one for a model of another size."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    import model as model_lib
    root = tmp_path_factory.mktemp("adapters")
    base, _ = model_lib.load_model(str(tiny_model_dir), device="cpu")
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(base, lora).save_pretrained(root / "good")
    other = LlamaForCausalLM(LlamaConfig(vocab_size=base.config.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")).save_pretrained(
        root / "other-base")
    return root


ADAPTER_DAMAGE = {  # name -> (file to damage, how, what the line says)
    "empty weights": ("adapter_model.safetensors", lambda b: b"", "adapter_model.safetensors"),
    "truncated weights": ("adapter_model.safetensors", lambda b: b[:len(b) // 2], "adapter_model.safetensors"),
    "corrupt weights": ("adapter_model.safetensors", lambda b: b"\x07" * len(b), "adapter_model.safetensors"),
    "malformed config": ("adapter_config.json", lambda b: b"{not json", "adapter_config.json"),
    "config not an object": ("adapter_config.json", lambda b: b"[1, 2]", "adapter_config.json"),
    "config wrong field": ("adapter_config.json",
                           lambda b: json.dumps({**json.loads(b), "r": "four"}).encode(), "does not fit"),
    "missing weights": ("adapter_model.safetensors", None, "missing"),
    "another base model": (None, None, "size mismatch"),
}


@pytest.mark.parametrize("program", ["eval", "sample"])
@pytest.mark.parametrize("case", sorted(ADAPTER_DAMAGE))
def test_damaged_adapter(case, program, adapters, tiny_model_dir, tmp_path, capsys, monkeypatch):
    name, damage, message = ADAPTER_DAMAGE[case]
    adapter = tmp_path / "adapter"
    shutil.copytree(adapters / ("other-base" if name is None else "good"), adapter)
    if name is not None and damage is None:
        (adapter / name).unlink()
    elif name is not None:
        (adapter / name).write_bytes(damage((adapter / name).read_bytes()))
    if program == "eval":
        argv = ["--model", str(tiny_model_dir), "--adapter", str(adapter), "--n", "1", "--out", str(tmp_path / "e")]
        err = fails_with_one_line(ev.main, argv, capsys)
    else:
        argv = ["--model", str(tiny_model_dir), "--adapter", str(adapter), "--prompt", "hi"]
        err = fails_with_one_line(sample.main, argv, capsys, monkeypatch)
    assert message in err and str(adapter) in err, err


def test_eval_of_a_run_with_a_garbage_latest_pointer(run_copy, tiny_model_dir, tmp_path, capsys):
    (run_copy / "latest").write_text("../../etc")
    argv = ["--model", str(tiny_model_dir), "--adapter", str(run_copy), "--out", str(tmp_path / "e")]
    assert "latest" in fails_with_one_line(ev.main, argv, capsys)


# ---------------------------------------------------------------------------------------------- resuming

def _damage_file(run, rel, how):
    path = run / "ckpt-000002" / rel
    if how == "missing":
        path.unlink()
    else:
        path.write_bytes({"empty": b"", "garbage": b"\x00garbage\xff" * 7,
                          "truncated": path.read_bytes()[:len(path.read_bytes()) // 2]}[how])


RESUME_DAMAGE = [  # (how the run directory is damaged, what the fallback line names)
    *[(lambda r, how=how: (r / "latest").write_text(how), "latest") for how in ("", "garbage\n", "ckpt-999999")],
    (lambda r: (r / "latest").unlink(), None),
    (lambda r: ((r / "latest").unlink(), (r / "latest").mkdir()), "latest"),
    *[(lambda r, rel=rel, how=how: _damage_file(r, rel, how), rel.split("/")[-1])
      for rel in ("adapter/adapter_model.safetensors", "optimizer.pt", "rng.pt", "state.json",
                  "adapter/adapter_config.json") for how in ("missing", "garbage", "truncated")],
    (lambda r: shutil.rmtree(r / "ckpt-000002"), None),
]


@pytest.mark.parametrize("damage, named", RESUME_DAMAGE)
def test_resume_falls_back_past_a_damaged_checkpoint(damage, named, run_copy, tiny_model_dir, capsys):
    """Each damage of the newest checkpoint (or of the pointer) resumes from what is left: at worst
    ckpt-000001, losing --save-every steps; metrics are trimmed to it, so the steps stay 1..N."""
    import loop
    damage(run_copy)
    args = train_r3.parse_args(train_args(tiny_model_dir, run_copy, "--steps", "3", "--resume"))
    capsys.readouterr()
    _, _, _, state, _, _ = loop.setup(args)
    out = capsys.readouterr().out
    if named is not None:
        assert named in out and ("falling back" in out or "damaged" in out), out
    assert state["step"] in (1, 2) and steps(run_copy) == list(range(1, state["step"] + 1))


def test_resume_with_every_checkpoint_damaged_is_one_line(run_copy, tiny_model_dir, capsys):
    for ckpt in ("ckpt-000001", "ckpt-000002"):
        (run_copy / ckpt / "optimizer.pt").write_bytes(b"garbage")
    before = snapshot(run_copy)
    err = fails_with_one_line(train_r3.main, train_args(tiny_model_dir, run_copy, "--steps", "3", "--resume"), capsys)
    assert "no checkpoint" in err and "optimizer.pt" in err
    assert snapshot(run_copy) == before


def test_damaged_newest_checkpoint_then_resume_keeps_steps_contiguous(run_copy, tiny_model_dir, capsys):
    (run_copy / "ckpt-000002" / "rng.pt").write_bytes(b"")
    train_r3.main(train_args(tiny_model_dir, run_copy, "--steps", "4", "--resume"))
    assert "falling back" in capsys.readouterr().out
    assert steps(run_copy) == [1, 2, 3, 4]


def test_damaged_failure_cache_is_rebuilt(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "failures.jsonl").write_text('{"model": "x"')  # truncated
    train_r3.main([*train_args(tiny_model_dir, run, "--steps", "1"), "--method", "r3", "--reflect-tokens", "2"])
    assert "damaged cache" in capsys.readouterr().out and steps(run) == [1]


def test_fresh_run_on_an_old_run_is_refused(run_copy, tiny_model_dir, tmp_path, capsys):
    before = snapshot(run_copy)
    err = fails_with_one_line(train_r3.main, train_args(tiny_model_dir, run_copy, "--steps", "3"), capsys)
    assert "--resume" in err and snapshot(run_copy) == before
    # metrics but no checkpoint (killed before the first one): refused fresh; --resume starts from step 0
    early = tmp_path / "early"
    early.mkdir()
    (early / "metrics.jsonl").write_text('{"step": 1, "kind": "train"}\n{"step": 2, "ki')
    assert "--resume" in fails_with_one_line(train_r3.main, train_args(tiny_model_dir, early, "--steps", "1"), capsys)
    train_r3.main(train_args(tiny_model_dir, early, "--steps", "2", "--resume"))
    assert steps(early) == [1, 2]


# ---------------------------------------------------------------------------------------------- the lock

def test_a_locked_run_directory_is_refused_and_a_killed_lock_does_not_block(run_copy, tiny_model_dir, capsys):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write(str(os.getpid())); f.flush()\n"
        "print('locked', flush=True); time.sleep(300)"), str(run_copy / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run_copy)
        for extra in ([], ["--resume"]):
            err = fails_with_one_line(train_r3.main, train_args(tiny_model_dir, run_copy, "--steps", "3", *extra),
                                      capsys)
            assert "in use by another run" in err and f"pid {holder.pid}" in err
        assert snapshot(run_copy) == before
    finally:
        holder.kill()  # SIGKILL: the OS drops its lock
        holder.wait()
    time.sleep(0.1)
    train_r3.main(train_args(tiny_model_dir, run_copy, "--steps", "3", "--resume"))
    assert steps(run_copy) == [1, 2, 3]


def test_errors_through_the_real_command(tiny_model_dir, tmp_path):
    """The same rules in a real process, argparse's own refusals (an unknown choice, a missing value or
    flag) included: one line. Run in a directory of its own, so nothing of the checkout is read or written."""
    (tmp_path / "a-file").write_text("keep me")
    for script, argv, message in [
        ("train_r3.py", ["--steps", "0"], "--steps"),
        ("train_r3.py", ["--task", "nope"], "invalid choice: 'nope'"),
        ("train_r3.py", ["--retry-reward", "bigger"], "--retry-reward"),
        ("eval.py", ["--n"], "--n: expected one argument"),
        ("sample.py", [], "required: --prompt"),
        ("export.py", ["runs/x"], "required: --out"),
        ("examples/report.py", ["--evals", "e"], "required: --runs, --out"),
        ("eval.py", ["--n", "1", "--out", "a-file"], "--out"),
        ("sample.py", ["--prompt", "", "--model", str(tiny_model_dir)], "--prompt"),
    ]:
        r = subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.startswith("error:") and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_trim_metrics_keeps_what_the_checkpoint_covers(tmp_path, capsys):
    """Step lines up to the checkpoint's step, Re-ReST lines of finished rounds, nothing half-written."""
    import rundir
    lines = [{"step": 1, "kind": "train"}, {"step": 2, "kind": "train"}, {"step": 3, "kind": "train"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "rew')
    rundir.trim_metrics(tmp_path, {"step": 2}, print)
    assert steps(tmp_path) == [1, 2] and "dropped 2 line(s)" in capsys.readouterr().out
    rerest = [{"step": 0, "kind": "rerest", "round": 1, "phase": "sample"}, {"step": 4, "round": 1, "phase": "eval"},
              {"step": 4, "round": 2, "phase": "sample"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rerest))
    rundir.trim_metrics(tmp_path, {"step": 4, "round": 1}, print)
    assert [json.loads(x)["round"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 1]


# ---------------------------------------------------------------------------------------------- issue 24

def no_model_load(monkeypatch):
    """Make loading a model fail loudly: a check that should come first shows as the one line, a late one as this.
    (export.py and sample.py import load_model from model when they run, so patching model covers them.)"""
    import loop
    import model as model_lib

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the check")
    for module in (model_lib, loop):
        monkeypatch.setattr(module, "load_model", boom)


def bad_adapter(adapters, tmp_path, file, contents):
    adapter = tmp_path / "adapter"
    shutil.copytree(adapters / "good", adapter)
    if contents is None:
        (adapter / file).unlink()
    else:
        (adapter / file).write_bytes(contents)
    return adapter


EXPORT_CASES = {  # name -> (how the --out and the adapter are given, what the line says)
    "out exists": (lambda t, a: (a, t / "taken"), "already exists"),
    "out under a file": (lambda t, a: (a, t / "a-file" / "merged"), "not a directory"),
    "out under a file, deeper": (lambda t, a: (a, t / "a-file" / "x" / "merged"), "not a directory"),
    "out in /proc": (lambda t, a: (a, "/proc/r3-merged"), "cannot create"),
    "out empty": (lambda t, a: (a, ""), "--out is empty"),
    "adapter missing": (lambda t, a: (t / "no-such-adapter", t / "merged"), "no adapter at"),
    "adapter config not JSON": (lambda t, a: (bad_adapter(a, t, "adapter_config.json", b"{not json"), t / "merged"),
                                "adapter_config.json"),
    "adapter config not UTF-8": (lambda t, a: (bad_adapter(a, t, "adapter_config.json", b"\xff\xfe"), t / "merged"),
                                 "adapter_config.json"),
    "adapter config a list": (lambda t, a: (bad_adapter(a, t, "adapter_config.json", b"[1]"), t / "merged"),
                              "adapter_config.json"),
    "adapter weights missing": (lambda t, a: (bad_adapter(a, t, "adapter_model.safetensors", None), t / "merged"),
                                "missing"),
    "adapter weights corrupt": (lambda t, a: (bad_adapter(a, t, "adapter_model.safetensors", b"\x07" * 64),
                                              t / "merged"), "corrupt"),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_checks_out_and_adapter_before_the_model_loads(case, adapters, tmp_path, capsys, monkeypatch):
    how, message = EXPORT_CASES[case]
    (tmp_path / "taken").mkdir()
    (tmp_path / "a-file").write_text("keep me")
    adapter, out = how(tmp_path, adapters)
    no_model_load(monkeypatch)
    import export
    err = fails_with_one_line(export.main, [str(adapter), "--out", str(out)], capsys)
    assert message in err, err
    assert not (tmp_path / "merged").exists() and (tmp_path / "a-file").read_text() == "keep me"
    assert not any(p.name == "merged" for p in tmp_path.rglob("*"))  # nor any parent it would have made


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in any directory")
def test_export_out_in_a_directory_it_cannot_write(adapters, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    no_model_load(monkeypatch)
    import export
    assert "--out" in fails_with_one_line(export.main, [str(adapters / "good"), "--out", str(locked / "m")], capsys)


def test_export_names_a_wrong_base_model_before_loading(adapters, tmp_path, capsys, monkeypatch):
    no_model_load(monkeypatch)
    import export
    for model, message in [("/no/such/model", "unknown model"), (str(tmp_path), "no config.json")]:
        argv = [str(adapters / "good"), "--out", str(tmp_path / "merged"), "--model", model]
        assert message in fails_with_one_line(export.main, argv, capsys)


def fake_package(root, name, init):
    """A package of that name on PYTHONPATH: its __init__ is `init`, or a plain module file when init is None."""
    if init is None:
        (root / f"{name}.py").write_text("# the user's own script, not the package\n")
    else:
        (root / name).mkdir()
        (root / name / "__init__.py").write_text(init)


TRACKER_CASES = {  # name -> (flag, fake package (name, __init__ or None for a shadowing file), env, what the line says)
    "wandb broken import": ("--wandb", ("wandb", "raise TypeError('Descriptors cannot be created directly')"), {},
                            "fails to import"),
    "wandb shadowed": ("--wandb", ("wandb", None), {}, "shadows the wandb package"),
    "wandb online no key": ("--wandb", None, {"WANDB_MODE": "online"}, "WANDB_MODE=online"),
    "tensorboard broken import": ("--tensorboard", ("tensorboard", "raise ImportError('protobuf mismatch')"), {},
                                  "pip install tensorboard"),
    "tensorboard shadowed": ("--tensorboard", ("tensorboard", None), {}, "shadows the tensorboard package"),
}


@pytest.mark.parametrize("case", sorted(TRACKER_CASES))
def test_tracker_failures_are_one_line_before_the_model_loads(case, tiny_model_dir, tmp_path):
    flag, fake, env, message = TRACKER_CASES[case]
    if flag == "--wandb":
        pytest.importorskip("wandb")
    site = tmp_path / "site"
    site.mkdir()
    if fake is not None:
        fake_package(site, *fake)
    run = tmp_path / "run"
    code = ("import sys, cli, loop, train_r3\n"
            "def boom(*a, **k): raise SystemExit('the model was loaded before the check')\n"
            "loop.load_model = boom\n"
            f"cli.run(lambda: train_r3.main({train_args(tiny_model_dir, run, flag)!r}))")
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1",
           **env}
    env.pop("WANDB_API_KEY", None)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: " + flag), r.stderr[-2000:]
    assert message in lines[0] and "Traceback" not in r.stderr
    assert not run.exists()  # before the run directory too


def test_wandb_that_fails_to_start_is_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")

    def init(**kw):
        raise RuntimeError("wandb.errors.CommError: bad settings")
    monkeypatch.setattr(wandb, "init", init)
    err = fails_with_one_line(train_r3.main, train_args(tiny_model_dir, tmp_path / "run", "--wandb"), capsys)
    assert "--wandb: wandb could not start" in err and "bad settings" in err


def test_tensorboard_dir_that_is_a_file_is_one_line(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    run.mkdir()
    (run / "tensorboard").write_text("not a directory")
    err = fails_with_one_line(train_r3.main, train_args(tiny_model_dir, run, "--tensorboard"), capsys)
    assert "--tensorboard" in err and "tensorboard" in err


PLOT_FILES = {  # name -> (bytes of the metrics file, what the line says)
    "random bytes": (bytes(range(256)) * 4, "not UTF-8"),
    "latin-1 text": ('{"step": 1, "reward": 0.5}\n{"note": "caf\xe9"}\n'.encode("latin-1"), ":2: not UTF-8"),
    "nested deep": (b"[" * 100_000 + b"]" * 100_000, "not a metrics line"),
    "huge integer": (b'{"step": ' + b"9" * 5000 + b"}\n", "not a metrics line"),
    "a JSON list": (b"[1, 2]\n", "not a metrics line"),
    "empty": (b"", "no metrics lines"),
}


@pytest.mark.parametrize("case", sorted(PLOT_FILES))
def test_plot_of_a_file_that_is_not_metrics(case, tmp_path, capsys):
    contents, message = PLOT_FILES[case]
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(contents)
    err = fails_with_one_line(ev.main, ["--plot", str(path)], capsys)
    assert message in err and str(path) in err, err
    assert not path.with_suffix(".png").exists()


GGUF_FILES = {  # name -> (contents, what the line says)
    "text": (b"hello, I am not a model\n", "not a GGUF file"),
    "empty": (b"", "not a GGUF file"),
    "truncated header": (b"GGUF\x03\x00\x00\x00junk", "could not load model"),
}


@pytest.mark.parametrize("program", ["train", "eval", "sample"])
@pytest.mark.parametrize("case", sorted(GGUF_FILES))
def test_a_gguf_that_is_not_one(case, program, tmp_path, capsys, monkeypatch):
    contents, message = GGUF_FILES[case]
    path = tmp_path / "garbage.gguf"
    path.write_bytes(contents)
    if program == "train":
        err = fails_with_one_line(train_r3.main, train_args(path, tmp_path / "run"), capsys)
        assert not (tmp_path / "run").exists() or message == "could not load model"
    elif program == "eval":
        err = fails_with_one_line(ev.main, ["--model", str(path), "--n", "1", "--out", str(tmp_path / "e")], capsys)
    else:
        err = fails_with_one_line(sample.main, ["--model", str(path), "--prompt", "hi"], capsys, monkeypatch)
    assert message in err and "garbage.gguf" in err, err


def test_a_gguf_named_directory_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "model.gguf").mkdir()
    err = fails_with_one_line(sample.main, ["--model", str(tmp_path / "model.gguf"), "--prompt", "hi"], capsys,
                              monkeypatch)
    assert "model.gguf" in err


def test_sample_takes_a_run_directory_as_eval_and_export_do(finished_run, tiny_model_dir, capsys, monkeypatch):
    for adapter in (finished_run, finished_run / "ckpt-000002", finished_run / "ckpt-000002" / "adapter"):
        monkeypatch.setattr(sys, "argv", ["sample.py", "--model", str(tiny_model_dir), "--adapter", str(adapter),
                                          "--prompt", "hi", "--max-new-tokens", "3", "--seed", "0"])
        sample.main()
        assert "--- sample 0" in capsys.readouterr().out
    # the old --help example: `latest` is a file, so latest/adapter is no directory at all
    err = fails_with_one_line(sample.main, ["--model", str(tiny_model_dir), "--adapter",
                                            str(finished_run / "latest" / "adapter"), "--prompt", "hi"],
                              capsys, monkeypatch)
    assert "no adapter at" in err


def test_sample_help_names_a_run_directory():
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert "run directory" in r.stdout and "latest/adapter" not in r.stdout


def test_a_latest_that_is_a_directory_falls_back_and_the_next_save_works(run_copy, tiny_model_dir, capsys):
    (run_copy / "latest").unlink()
    (run_copy / "latest").mkdir()
    (run_copy / "latest" / "notes.txt").write_text("the user's")
    train_r3.main(train_args(tiny_model_dir, run_copy, "--steps", "3", "--resume"))
    out = capsys.readouterr().out
    assert "moved it to" in out and steps(run_copy) == [1, 2, 3]
    assert (run_copy / "latest").read_text().strip() == "ckpt-000003"
    assert (run_copy / "latest.not-a-pointer" / "notes.txt").read_text() == "the user's"  # nothing lost


def test_a_latest_tmp_left_as_a_directory_does_not_break_the_save(run_copy, tiny_model_dir, capsys):
    (run_copy / ".latest.tmp").mkdir()
    (run_copy / ".tmp-ckpt-000003").write_text("a file where the save's temporary directory goes")
    train_r3.main(train_args(tiny_model_dir, run_copy, "--steps", "3", "--resume"))
    assert steps(run_copy) == [1, 2, 3] and (run_copy / "latest").read_text().strip() == "ckpt-000003"


def embedded_r3_run(tmp_path, warmup_steps: int):
    """A run directory the main command would have started (the embedded model, r3, its warm-up)."""
    run = tmp_path / "main-run"
    run.mkdir()
    args = {"task": "countdown", "method": "r3", "model": "smollm2-135m", "lora_r": "16", "lora_alpha": "None",
            "lora_targets": "all", "init_adapter": "None", "warmup_steps": str(warmup_steps), "refresh_failures": "6"}
    (run / "args.json").write_text(json.dumps(args))
    return run


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be at least 1; got 0"),  # not "--warmup-steps 0 leaves no R3 step"
    (["--steps", "-3"], "--steps must be at least 1"),
    (["--quick", "--steps", "1"], "--warmup-steps 1 (set by --quick) leaves no R3 step of --steps 1"),
    (["--steps", "3", "--warmup-steps", "3"], "--warmup-steps 3 leaves no R3 step of --steps 3;"),
    (["--group-size", "0"], "--group-size must be at least 1"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
])
def test_messages_name_the_flag_to_fix(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    no_model_load(monkeypatch)
    assert message in fails_with_one_line(train_r3.main, ["--task", "countdown", *argv], capsys)


def test_quick_resume_names_quick_as_the_setter(tmp_path, capsys, monkeypatch):
    """--quick set --warmup-steps; the run was trained with the recipe's 8: the message says who set which."""
    no_model_load(monkeypatch)
    run = embedded_r3_run(tmp_path, warmup_steps=8)
    err = fails_with_one_line(train_r3.main, ["--task", "countdown", "--quick", "--resume", "--out-dir", str(run)],
                              capsys)
    assert "trained with --warmup-steps 8" in err and "not --warmup-steps 1 (set by --quick)" in err, err


@pytest.mark.parametrize("argv", [["--quick", "--resume"], ["--quick", "--source", "/no/such/data.jsonl"],
                                  ["--quick", "--model", "/no/such/model"], ["--quick", "--steps", "0"]])
def test_a_refused_quick_run_leaves_no_temporary_directory(argv, tmp_path, capsys, monkeypatch):
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    no_model_load(monkeypatch)
    fails_with_one_line(train_r3.main, ["--task", "countdown", *argv], capsys)
    assert not list(tmp_path.glob("r3-quick-*"))


def test_quick_out_dir_is_new_and_made_only_by_the_run(tmp_path, monkeypatch):
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    a = train_r3.parse_args(["--quick"])
    assert a.out_dir.parent == tmp_path and a.out_dir.name.startswith("r3-quick-countdown-r3-")
    assert not a.out_dir.exists()


def test_eval_size_0_means_no_eval(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train_r3.main(train_args(tiny_model_dir, run, "--steps", "1", "--eval-size", "0", "--eval-every", "1"))
    assert "eval first try" not in capsys.readouterr().out
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1] and not any("acc_t1" in r for r in lines)
    r = subprocess.run([sys.executable, str(ROOT / "train_r3.py"), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert "0: no eval" in r.stdout


EMPTY_FLAGS = [  # (program, argv, the flag the line names)
    ("train", ["--out-dir", ""], "--out-dir is empty"), ("train", ["--source", ""], "--source is empty"),
    ("train", ["--init-adapter", ""], "--init-adapter is empty"), ("train", ["--model", " "], "--model is empty"),
    ("train", ["--wandb="], "--wandb is empty"),
    ("eval", ["--out", ""], "--out is empty"), ("eval", ["--adapter", ""], "--adapter is empty"),
    ("eval", ["--plot", ""], "--plot is empty"), ("eval", ["--plot-out", ""], "--plot-out is empty"),
    ("sample", ["--adapter", "", "--prompt", "hi"], "--adapter is empty"),
    ("sample", ["--model", "", "--prompt", "hi"], "--model is empty"),
    ("export", ["", "--out", "x"], "adapter is empty"), ("export", ["a", "--out", ""], "--out is empty"),
    ("export", ["a", "--out", "x", "--model", ""], "--model is empty"),
]


@pytest.mark.parametrize("program, argv, message", EMPTY_FLAGS)
def test_an_empty_path_or_name_is_refused_not_taken_as_the_default(program, argv, message, tmp_path, capsys,
                                                                   monkeypatch):
    import export
    monkeypatch.chdir(tmp_path)
    no_model_load(monkeypatch)
    if program == "sample":
        err = fails_with_one_line(sample.main, argv, capsys, monkeypatch)
    else:
        err = fails_with_one_line({"train": train_r3.main, "eval": ev.main, "export": export.main}[program], argv,
                                  capsys)
    assert message in err, err
    assert not list(tmp_path.iterdir())  # nothing trained, evaluated or written here


@pytest.mark.parametrize("program, argv, flag", [
    ("sample", ["--temperature", "inf", "--prompt", "hi"], "--temperature"),
    ("sample", ["--temperature", "nan", "--prompt", "hi"], "--temperature"),
    ("sample", ["--top-p", "nan", "--prompt", "hi"], "--top-p"),
    ("eval", ["--temperature", "inf"], "--temperature"),
    ("train", ["--temperature", "inf"], "--temperature"), ("train", ["--lr", "inf"], "--lr"),
    ("train", ["--kl-beta", "inf"], "--kl-beta"), ("train", ["--clip-eps", "inf"], "--clip-eps"),
    ("train", ["--method", "score", "--alpha", "inf"], "--alpha"),
    ("train", ["--method", "score", "--beta1=-inf"], "--beta1"),
])
def test_an_infinite_number_is_refused(program, argv, flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    no_model_load(monkeypatch)
    if program == "sample":
        err = fails_with_one_line(sample.main, argv, capsys, monkeypatch)
    else:
        err = fails_with_one_line(train_r3.main if program == "train" else ev.main, argv, capsys)
    assert err.startswith(f"error: {flag} must be"), err


@pytest.mark.parametrize("name", ["data.JSONL", "data.Jsonl", "data.JSON"])
def test_an_upper_case_suffix_is_the_same_file_type(name, tmp_path):
    import tasks
    path = tmp_path / name
    path.write_text("".join(json.dumps({"nums": [i, 4], "target": i + 4}) + "\n" for i in range(1, 11)))
    examples = tasks.load_examples("countdown", "train", source=str(path)) + \
        tasks.load_examples("countdown", "test", source=str(path))
    assert len(examples) == 10


# ---------------------------------------------------------------------------------------------- the order of errors

@pytest.fixture
def checkout_with_a_run(tmp_path, monkeypatch):
    """A working directory where the main command already ran: runs/countdown-r3 holds a run."""
    run = tmp_path / "runs" / "countdown-r3"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 0, "kind": "eval", "acc_t1": 0.0}\n')
    monkeypatch.chdir(tmp_path)
    return run


@pytest.mark.parametrize("argv, message", [
    (["--model", "/no/such/model"], "unknown model '/no/such/model'"),  # not the run directory
    (["--source", "/no/such/data.jsonl"], "/no/such/data.jsonl"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--init-adapter", "/no/such/run"], "no adapter at /no/such/run"),
    (["--wandb"], "--wandb"), (["--tensorboard"], "--tensorboard"),  # a tracker that cannot start
    ([], "already holds a run"),  # and only then the run directory
])
def test_errors_come_in_the_order_a_user_fixes_them(argv, message, checkout_with_a_run, capsys, monkeypatch):
    """Flags first, then data and model, then the run directory."""
    before = snapshot(checkout_with_a_run)
    no_model_load(monkeypatch)
    if argv in (["--wandb"], ["--tensorboard"]):
        monkeypatch.setitem(sys.modules, "wandb" if argv == ["--wandb"] else "torch.utils.tensorboard", None)
    err = fails_with_one_line(train_r3.main, ["--task", "countdown", *argv], capsys)
    assert message in err, err
    assert snapshot(checkout_with_a_run) == before


def test_the_real_command_names_the_model_not_the_run_directory(checkout_with_a_run, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train_r3.py"), "--task", "countdown", "--model", "/no/such/model"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown model '/no/such/model'"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- an offline Hub

@pytest.fixture
def no_network(monkeypatch):
    """No network: every connect fails, and says where and with what timeout it was tried."""
    import socket
    import model as model_lib
    tried = []

    def connect(address, timeout=None, *a, **k):
        tried.append((address, timeout))
        raise OSError("Network is unreachable")
    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(proxy, raising=False)
    model_lib.hub_reachable.cache_clear()
    yield tried
    model_lib.hub_reachable.cache_clear()


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "no network"])
@pytest.mark.parametrize("program", ["train", "eval", "sample", "export"])
def test_an_offline_hub_id_fails_in_seconds(offline, program, adapters, no_network, tmp_path, capsys, monkeypatch):
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # (read by a fresh huggingface_hub only)
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_id = "someone/no-such-model"
    argv = {"train": train_args(hub_id, tmp_path / "run"),
            "eval": ["--model", hub_id, "--n", "1", "--out", str(tmp_path / "e")],
            "sample": ["--model", hub_id, "--prompt", "hi"],
            "export": [str(adapters / "good"), "--out", str(tmp_path / "m"), "--model", hub_id]}[program]
    main = {"train": train_r3.main, "eval": ev.main, "sample": sample.main}.get(program)
    if main is None:
        import export
        main = export.main
    t0 = time.perf_counter()
    if program == "sample":
        err = fails_with_one_line(main, argv, capsys, monkeypatch)
    else:
        err = fails_with_one_line(main, argv, capsys)
    assert time.perf_counter() - t0 < 10  # it took 27-52 s of retries (the data load counts here for train)
    assert f"could not load '{hub_id}' from the Hugging Face Hub" in err, err
    assert not (tmp_path / "run").exists()
    if offline == "no network":
        assert no_network and all(host == "huggingface.co" and timeout <= 2 for (host, _), timeout in no_network)
    else:
        assert not no_network  # HF_HUB_OFFLINE: not even a probe


def test_a_hanging_connect_is_cut_off_at_the_timeout(monkeypatch):
    import socket
    import threading
    import model as model_lib
    release = threading.Event()

    def hang(*a, **k):  # a DNS lookup that hangs (until the test is over)
        release.wait(30)
        raise OSError("timed out")
    monkeypatch.setattr(socket, "create_connection", hang)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    model_lib.hub_reachable.cache_clear()
    t0 = time.perf_counter()
    try:
        assert model_lib.hub_reachable(timeout=0.5) is False
    finally:
        model_lib.hub_reachable.cache_clear()
        release.set()
    assert time.perf_counter() - t0 < 3


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "no network"])
def test_an_offline_hub_model_downloaded_before_loads_from_the_cache(offline, tiny_model_dir, no_network, tmp_path,
                                                                     monkeypatch):
    """The Hub cache's layout (models--owner--name/refs/main -> snapshots/<commit>/files): read with no network."""
    import huggingface_hub.constants
    import model as model_lib
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    m, tok = model_lib.load_model("someone/tiny", device="cpu")
    assert m.config.num_hidden_layers == 2 and tok("hi")["input_ids"]


def test_datasets_from_an_unreachable_hub_fail_at_once(no_network, capsys):
    import tasks
    t0 = time.perf_counter()
    with pytest.raises(cli.UsageError, match="cannot be reached"):
        tasks.load_examples("countdown", "train", source="someone/no-such-dataset")
    assert time.perf_counter() - t0 < 5


def test_the_experiment_script_rejects_an_unknown_arm_before_it_trains_anything(tmp_path):
    """examples/r3_vs_grpo.sh checks ARMS first: it used to train the shared start adapter (4 min) and then fail."""
    env = {**os.environ, "ARMS": "grpo nope", "OUT": str(tmp_path / "runs"), "EVALS": str(tmp_path / "evals")}
    done = subprocess.run(["bash", str(ROOT / "examples/r3_vs_grpo.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and done.stderr.strip() == "examples/r3_vs_grpo.sh: unknown arm 'nope' in ARMS"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "evals").exists()
