"""Issue 15: every bad input and broken file is one `error:` line and exit code 2 (no traceback), and the
run directory's good files stay as they were; a damaged newest checkpoint falls back to the one before."""
import json
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
    (["--method", "r3", "--steps", "4", "--warmup-steps", "1"], "--warmup-steps 0"),  # a run's phases stay
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


def test_train_out_dir_that_is_a_file_or_under_one(tiny_model_dir, tmp_path, capsys):
    f = tmp_path / "a-file"
    f.write_text("keep me")
    assert "not a directory" in fails_with_one_line(train_r3.main, train_args(tiny_model_dir, f), capsys)
    assert "--out-dir" in fails_with_one_line(train_r3.main, train_args(tiny_model_dir, f / "sub"), capsys)
    assert f.read_text() == "keep me"


@pytest.mark.parametrize("flags, message", [
    (["--n", "0"], "--n"), (["--batch-size", "0"], "--batch-size"), (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--temperature", "-1"], "--temperature"), (["--reflect-tokens", "-1"], "--reflect-tokens"),
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
    """The same rules in a real process: argparse's own errors keep its usage line; ours are one line."""
    for script, argv, message in [
        ("train_r3.py", ["--steps", "0"], "--steps"),
        ("eval.py", ["--n", "1", "--out", str(ROOT / "README.md")], "--out"),
        ("sample.py", ["--prompt", "", "--model", str(tiny_model_dir)], "--prompt"),
    ]:
        r = subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
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
