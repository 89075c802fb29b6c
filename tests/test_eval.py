"""eval.py: the two-try table's arithmetic, resuming a killed eval, --compare, and the training plots.

Correctness is scripted (tasks.verify is replaced), so the tiny random model's text does not matter:
each example's verdict at each call is fixed in advance, and the table must add up to it.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import cli
import eval as ev
import tasks
from verifiers import Verdict

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- pure arithmetic

def rec(i, t1, t2, tok1, tok2, reflection=None, new=True, seconds=1.0):
    """A hand-made record; t1/t2 are an error category, or None for a correct try."""
    gen = tok1 + (tok2 if new else 0) + (reflection or 0)
    return {"id": str(i), "t1": {"correct": t1 is None, "error": t1, "tokens": tok1},
            "t2": {"correct": t2 is None, "error": t2, "tokens": tok2, "new": new},
            "reflection": reflection and {"tokens": reflection}, "gen_tokens": gen, "seconds": seconds}


def test_summarize_hand_computed():
    records = [rec(0, None, None, 10, 10, new=False),                          # right, stands
               rec(1, "format", None, 20, 6, reflection=8),                     # wrong -> right
               rec(2, "missed_target", "wrong_numbers", 4, 8, reflection=12, seconds=2.0),
               rec(3, None, "missed_target", 6, 2, seconds=0.0)]                # right -> wrong
    s = ev.summarize(records)
    assert s["n"] == 4
    assert s["acc_t1"] == 0.5 and s["acc_t2"] == 0.5 and s["delta"] == 0.0
    assert s["delta_i2c"] == 0.25 and s["delta_c2i"] == 0.25
    assert s["errors_t1"] == {"format": 1, "missed_target": 1}
    assert s["errors_t2"] == {"missed_target": 1, "wrong_numbers": 1}
    assert s["tokens_t1"] == 10.0 and s["tokens_t2"] == 6.5 and s["tokens_reflection"] == 10.0
    assert s["gen_tokens"] == 10 + 34 + 24 + 8 and s["wall_s"] == 4.0 and s["tokens_per_s"] == 76 / 4

    table = ev.markdown_table({"base": s, "trained": ev.summarize(records[:2])})
    lines = table.splitlines()
    assert lines[0] == "| metric | base | trained |"
    assert "| accuracy@t1 (%) | 50.0 | 50.0 |" in lines
    assert "| accuracy@t2 (%) | 50.0 | 100.0 |" in lines
    assert "| Δ(t1,t2) (%) | +0.0 | +50.0 |" in lines
    assert "| errors@t2: wrong_numbers | 1 | 0 |" in lines     # a category one column lacks counts 0
    assert all(line.count("|") == 4 for line in lines)


def test_summarize_empty():
    s = ev.summarize([])
    assert s["n"] == 0 and s["acc_t1"] == 0.0 and s["tokens_per_s"] == 0.0 and s["errors_t1"] == {}


def test_read_results_drops_only_a_half_written_last_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"config": {}}\n{"id": "a", "x": 1}\n{"id": "b", "x"')
    assert list(ev.read_results(path)) == ["a"]
    assert path.read_text() == '{"config": {}}\n{"id": "a", "x": 1}\n'  # ready for appends
    path.write_text('{"id": "a"}\n{"id": \n{"id": "c"}\n')
    with pytest.raises(cli.UsageError, match=r"results.jsonl:2"):
        ev.read_results(path)


# ---------------------------------------------------------------------------------------------- tiny model

def scripted(monkeypatch, script: dict) -> list:
    """tasks.verify answers the k-th call for an example with script[id][k] (an error, or None: correct).
    Returns the list of ids verified, in order."""
    calls = []

    def verify(task, text, example):
        k = calls.count(example["id"])
        calls.append(example["id"])
        error = script[example["id"]][k]
        return Verdict(error is None, error)
    monkeypatch.setattr(tasks, "verify", verify)
    return calls


def flags(model_dir, out, n, *extra):
    return ["--task", "countdown", "--model", str(model_dir), "--n", str(n), "--batch-size", "2",
            "--max-new-tokens", "4", "--reflect-tokens", "3", "--out", str(out), *extra]


def ids(n):
    return [ex["id"] for ex in tasks.load_examples("countdown", "test", n=n, seed=0)]


def results(out: Path) -> list[dict]:
    [path] = out.glob("results-*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()[1:]]


R3_SCRIPT = [(None,), ("format", None), ("missed_target", "wrong_numbers"), ("format", "format"), (None,),
             ("invalid_equation", None)]


def test_r3_table_on_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    calls = scripted(monkeypatch, dict(zip(ids(6), R3_SCRIPT)))
    s = ev.main(flags(tiny_model_dir, tmp_path, 6))["base"]
    assert len(calls) == 6 + 4  # a second try only after the 4 failed first tries
    assert s["n"] == 6 and s["acc_t1"] == pytest.approx(2 / 6) and s["acc_t2"] == pytest.approx(4 / 6)
    assert s["delta"] == pytest.approx(2 / 6) and s["delta_i2c"] == pytest.approx(2 / 6) and s["delta_c2i"] == 0
    assert s["errors_t1"] == {"format": 2, "invalid_equation": 1, "missed_target": 1}
    assert s["errors_t2"] == {"format": 1, "wrong_numbers": 1}
    rows = results(tmp_path)
    assert [r["id"] for r in rows] == ids(6)
    for r, script in zip(rows, R3_SCRIPT):
        passed = script[0] is None
        assert (r["reflection"] is None) == passed and r["t2"]["new"] == (not passed)
        if passed:
            assert r["t2"] == {**r["t1"], "new": False}  # a passed first try stands as the second
        else:
            assert 1 <= r["reflection"]["tokens"] <= 3 and 1 <= r["t2"]["tokens"] <= 4
    assert s["tokens_t1"] == pytest.approx(sum(r["t1"]["tokens"] for r in rows) / 6)
    assert s["tokens_t2"] == pytest.approx(sum(r["t2"]["tokens"] for r in rows) / 6)
    assert s["tokens_reflection"] == pytest.approx(sum(r["reflection"]["tokens"] for r in rows if r["reflection"]) / 4)
    [md] = tmp_path.glob("summary-*.md")
    assert "| Δ(t1,t2) (%) | +33.3 |" in md.read_text()
    assert json.loads(next(tmp_path.glob("summary-*.json")).read_text())["columns"]["base"] == s


def test_score_second_try_on_every_example(tiny_model_dir, tmp_path, monkeypatch):
    script = [(None, "missed_target"), ("format", None), (None, None), ("wrong_numbers", "wrong_numbers")]
    calls = scripted(monkeypatch, dict(zip(ids(4), script)))
    s = ev.main(flags(tiny_model_dir, tmp_path, 4, "--method", "score"))["base"]
    assert len(calls) == 8
    assert (s["acc_t1"], s["acc_t2"], s["delta"], s["delta_i2c"], s["delta_c2i"]) == (0.5, 0.5, 0.0, 0.25, 0.25)
    assert s["errors_t1"] == {"format": 1, "wrong_numbers": 1}
    assert s["errors_t2"] == {"missed_target": 1, "wrong_numbers": 1}
    assert all(r["t2"]["new"] and r["reflection"] is None for r in results(tmp_path))


def test_resume_redoes_only_missing_examples(tiny_model_dir, tmp_path, monkeypatch):
    script = dict(zip(ids(6), R3_SCRIPT))
    scripted(monkeypatch, script)
    whole = ev.main(flags(tiny_model_dir, tmp_path / "a", 6))["base"]

    # A kill during the second chunk's write: header, two whole records, half of the third.
    (tmp_path / "b").mkdir()
    [path] = (tmp_path / "a").glob("results-*.jsonl")
    lines = path.read_text().splitlines()
    (tmp_path / "b" / path.name).write_text("\n".join(lines[:3]) + "\n" + lines[3][:len(lines[3]) // 2])
    calls = scripted(monkeypatch, script)
    resumed = ev.main(flags(tiny_model_dir, tmp_path / "b", 6))["base"]
    assert sorted(set(calls)) == sorted(ids(6)[2:])  # examples 0 and 1 were not redone
    assert len(calls) == 4 + 3
    timing = ("wall_s", "tokens_per_s")
    assert {k: v for k, v in resumed.items() if k not in timing} == {k: v for k, v in whole.items() if k not in timing}
    assert [r["id"] for r in results(tmp_path / "b")] == ids(6)  # the half line is gone, every line parses

    calls = scripted(monkeypatch, script)
    ev.main(flags(tiny_model_dir, tmp_path / "b", 6))
    assert calls == []  # all done: nothing is sampled again


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """A training run directory whose latest checkpoint holds a LoRA adapter that changes the outputs."""
    import torch
    import model as model_lib
    m, _ = model_lib.load_model(str(tiny_model_dir), lora_r=4, device="cpu")
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    run = tmp_path_factory.mktemp("run")
    m.save_pretrained(run / "ckpt-000003" / "adapter")
    (run / "latest").write_text("ckpt-000003")
    return run


def test_compare_base_and_adapter_side_by_side(tiny_model_dir, run_dir, tmp_path, monkeypatch):
    # Per example: the base column's first and second try fail; the trained column passes at once.
    scripted(monkeypatch, {i: ("format", "format", None) for i in ids(4)})
    columns = ev.main(flags(tiny_model_dir, tmp_path / "cmp", 4, "--adapter", str(run_dir), "--compare"))
    assert list(columns) == ["base", "trained"]
    assert (columns["base"]["acc_t1"], columns["base"]["acc_t2"]) == (0.0, 0.0)
    assert (columns["trained"]["acc_t1"], columns["trained"]["acc_t2"]) == (1.0, 1.0)
    [md] = (tmp_path / "cmp").glob("summary-*.md")
    assert "| metric | base | trained |" in md.read_text()
    summary = json.loads(next((tmp_path / "cmp").glob("summary-*.json")).read_text())
    assert summary["configs"]["trained"]["adapter"] == str((run_dir / "ckpt-000003" / "adapter").resolve())
    texts = {k: [json.loads(x)["t1"]["text"] for x in Path(p).read_text().splitlines()[1:]]
             for k, p in summary["results"].items()}

    # The base column is the base model (adapter switched off), and the adapter changes the text.
    scripted(monkeypatch, {i: ("format", "format") for i in ids(4)})
    ev.main(flags(tiny_model_dir, tmp_path / "base", 4))
    assert [r["t1"]["text"] for r in results(tmp_path / "base")] == texts["base"]
    assert texts["trained"] != texts["base"]


def test_adapter_errors(tiny_model_dir, tmp_path):
    with pytest.raises(cli.UsageError, match="no adapter at"):
        ev.main(flags(tiny_model_dir, tmp_path, 2, "--adapter", str(tmp_path / "missing")))
    with pytest.raises(cli.UsageError, match="--compare needs --adapter"):
        ev.main(flags(tiny_model_dir, tmp_path, 2, "--compare"))


# ---------------------------------------------------------------------------------------------- plots

def test_plot_writes_png_and_later_lines_win(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    line = lambda step, reward, **kw: json.dumps({"step": step, "kind": "train", "reward": reward,  # noqa: E731
                                                  "kl": 0.01 * step, "signal_frac": 0.5, **kw})
    metrics.write_text("\n".join([line(1, 0.1), line(2, 0.2, acc_t1=0.1, acc_t2=0.2), line(3, 0.0),
                                  line(3, 0.3), line(4, 0.4, acc_t1=0.2, acc_t2=0.4)]) + "\n")
    rows = ev.read_metrics(metrics)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[2]["reward"] == 0.3  # resumed run: later wins
    ev.main(["--plot", str(metrics)])
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ev.main(["--plot", str(metrics), "--plot-out", str(tmp_path / "sub" / "curves.png")])
    assert (tmp_path / "sub" / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize("content, where", [('{"step": 1, "reward": 0}\n{"step": 2, "rew\n', "metrics.jsonl:2"),
                                            ('{"step": 1}\n[1, 2]\n', "metrics.jsonl:2"),
                                            ('{"reward": 0.5}\n', "metrics.jsonl:1"),
                                            (None, "metrics file not found")])
def test_plot_bad_file_is_one_line_exit_2(tmp_path, content, where):
    metrics = tmp_path / "metrics.jsonl"
    if content is not None:
        metrics.write_text(content)
    p = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--plot", str(metrics)], capture_output=True,
                       text=True, cwd=tmp_path)
    assert p.returncode == 2 and where in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_missing_adapter_is_one_line_exit_2(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--adapter", str(tmp_path / "nope")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2 and "no adapter at" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_results_file_follows_the_code_and_the_adapter_weights(tiny_model_dir, run_dir, tmp_path, monkeypatch):
    """An edited prompt or verifier, or other weights at the same adapter path, never reads stale results."""
    import shutil

    from safetensors.torch import load_file, save_file
    passing = {i: (None,) for i in ids(2)}

    def sampled(*extra) -> int:  # how many first tries this eval verified (0: all read from the file)
        calls = scripted(monkeypatch, passing)
        ev.main(flags(tiny_model_dir, tmp_path / "out", 2, *extra))
        return len(calls)
    prompts = tmp_path / "prompts.py"  # stands for an edited tasks.py
    prompts.write_text("A = 1\n")
    monkeypatch.setattr(ev, "RESULT_CODE", ev.RESULT_CODE + (str(prompts),))
    assert sampled() == 2 and sampled() == 0  # the same code: the results are read back
    prompts.write_text("A = 2\n")
    assert sampled() == 2 and len(list((tmp_path / "out").glob("results-*.jsonl"))) == 2

    adapter = tmp_path / "adapter"
    shutil.copytree(run_dir / "ckpt-000003" / "adapter", adapter)
    assert sampled("--adapter", str(adapter)) == 2 and sampled("--adapter", str(adapter)) == 0
    [weights] = adapter.glob("adapter_model.safetensors")
    save_file({k: v * 2 for k, v in load_file(weights).items()}, weights)  # retrained, same path
    assert sampled("--adapter", str(adapter)) == 2


@pytest.mark.parametrize("flag, trained, default", [("reflect_prompt", "candidate", "approach"),
                                                   ("retry_context", "reflection", "conversation")])
def test_second_try_flags_follow_the_adapters_run_and_name_its_results(tiny_model_dir, run_dir, tmp_path,
                                                                      monkeypatch, flag, trained, default):
    """A run trained with --reflect-prompt candidate (--retry-context reflection) is asked for its second
    tries so (its args.json says), an explicit flag wins, and the two ways never share a results file.
    The paper's default keeps its name."""
    import shutil
    import rollout
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    asked, real = [], rollout.reflect_and_retry
    monkeypatch.setattr(rollout, "reflect_and_retry", lambda *a, **kw: asked.append(kw[flag]) or real(*a, **kw))
    option = "--" + flag.replace("_", "-")

    def evaluate(out, *extra):
        asked.clear()
        scripted(monkeypatch, {i: ("format", "format") for i in ids(2)})
        ev.main(flags(tiny_model_dir, tmp_path / out, 2, "--adapter", str(run), *extra))
        [summary] = (tmp_path / out).glob("summary-*.json")
        config = json.loads(summary.read_text())["configs"]["trained"]
        return set(asked), config.get(flag)
    (run / "args.json").write_text(json.dumps({"model": str(tiny_model_dir), flag: trained}))
    assert evaluate("trained") == ({trained}, trained)
    assert evaluate("flag", option, default) == ({default}, None)
    (run / "args.json").write_text(json.dumps({"model": str(tiny_model_dir)}))  # a run from before the flag
    assert evaluate("older") == ({default}, None)
    assert evaluate("asked", option, trained) == ({trained}, trained)
    names = {p.name for out in ("trained", "flag", "older", "asked") for p in (tmp_path / out).glob("results-*")}
    assert len(names) == 2  # one file per way, whichever way it was chosen


def test_rolling_mean_never_looks_ahead():
    assert ev.rolling_mean([0, 0, 0, 9, 0], window=3) == [0, 0, 0, 3, 3]
    assert ev.rolling_mean([2, 4], window=5) == [2, 3]  # fewer points at the start


def test_several_runs_plot_their_mean_and_band(tmp_path):
    paths = []
    for k, rewards in enumerate(([0.1, 0.2, 0.3], [0.3, 0.4, 0.5, 0.9])):  # the second run has one more step
        paths.append(tmp_path / f"s{k}.jsonl")
        paths[-1].write_text("".join(json.dumps({"step": i + 1, "kind": "train", "reward": r, "kl": 0.0,
                                                 "signal_frac": 0.5, "phase": "warmup" if i == 0 else "r3"}) + "\n"
                                     for i, r in enumerate(rewards)))
    rows = [ev.read_metrics(p) for p in paths]
    steps, mean, lo, hi = ev.seed_mean(rows, "reward")
    assert steps == [1, 2, 3] and [round(m, 6) for m in mean] == [0.2, 0.3, 0.4] and lo == [0.1, 0.2, 0.3]
    assert hi == [0.3, 0.4, 0.5] and ev.phase_cuts(rows[0]) == [(1, "warmup", "r3")]
    ev.main(["--plot", *map(str, paths), "--plot-out", str(tmp_path / "seeds.png")])
    assert (tmp_path / "seeds.png").stat().st_size > 1000
