"""examples/report.py: the R3-vs-GRPO table from eval.py's result files, with bootstrap intervals."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "examples"))
import report  # noqa: E402


def write_eval(evals, name, adapter, outcomes):
    """An eval.py results file: the header line, then one record per problem (first try, second try)."""
    lines = [json.dumps({"config": {"adapter": adapter}})]
    for i, (t1, t2) in enumerate(outcomes):
        lines.append(json.dumps({"id": f"p{i}", "t1": {"correct": t1, "error": None if t1 else "missed_target",
                                                     "text": "<answer> 1 + 2 </answer>"},
                                 "t2": {"correct": t2, "error": None if t2 else "format",
                                        "text": "<answer> 1 + 2 </answer>" if not t2 else "<answer> 3 </answer>"},
                                 "reflection": None if t1 else {"text": "use * instead", "tokens": 4}}))
    (evals / f"results-{name}.jsonl").write_text("\n".join(lines) + "\n")


def test_table_rows_intervals_and_the_arm_difference(tmp_path):
    evals, runs = tmp_path / "evals", tmp_path / "runs"
    evals.mkdir()
    for run in ("start", "r3-s1", "r3-s2", "grpo-s1", "grpo-s2"):
        (runs / run / "ckpt-000001" / "adapter").mkdir(parents=True)
        (runs / run / "metrics.jsonl").write_text(json.dumps({"step": 1, "kind": "train", "solved": 0.5,
                                                              "signal_frac": 1.0, "tokens_total": 1000}) + "\n")
    (runs / "r3-s3").mkdir()  # still training, not evaluated: left out of the tokens column and the curves
    (runs / "r3-s3" / "metrics.jsonl").write_text(json.dumps({"step": 1, "kind": "train", "solved": 0.5,
                                                              "signal_frac": 1.0, "tokens_total": 9000}) + "\n")
    n = 200
    write_eval(evals, "base", None, [(False, False)] * n)
    write_eval(evals, "start", str(runs / "start/ckpt-000001/adapter"), [(i < 20, i < 20) for i in range(n)])
    for s in (1, 2):  # r3 fixes 60 more problems at the second try; grpo fixes none
        write_eval(evals, f"r3{s}", str(runs / f"r3-s{s}/ckpt-000001/adapter"), [(i < 20, i < 80) for i in range(n)])
        write_eval(evals, f"g{s}", str(runs / f"grpo-s{s}/ckpt-000001/adapter"), [(i < 20, i < 20) for i in range(n)])
    report.main(["--evals", str(evals), "--runs", str(runs), "--out", str(tmp_path / "out"), "--bootstrap", "300"])
    table = (tmp_path / "out.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in table.split("Seed by seed")[0].splitlines()
            if line.startswith("| ")}
    assert rows["base model"].startswith("| base model | 1 | 0.0 [0.0, 0.0] | 0.0 [0.0, 0.0]")
    assert "| r3 | 2 | 10.0 [" in rows["r3"] and "| 40.0 [" in rows["r3"] and "| 30.0 [" in rows["r3"]
    assert rows["grpo"].split(" | ")[3].startswith("10.0 [")
    assert "r3 − grpo, acc@t2: +30.0 points" in table and "(excludes 0)" in table
    assert "r3 − grpo, acc@t1: +0.0 points, 95% interval [+0.0, +0.0] (includes 0)" in table
    # every failed retry repeated the first try; the run still training (r3-s3) is not in the tokens column
    assert "100% of 360" in rows["grpo"] and rows["r3"].endswith("| 1,000 |")
    assert rows["r3"].split(" | ")[-2] == "60 / 60" and rows["grpo"].split(" | ")[-2] == "0 / 0"  # fixes per seed
    assert (tmp_path / "out.png").stat().st_size > 0
    # the fixes that explain Δ i→c: r3's (8 of its 120, seed by seed), none for grpo, which fixed nothing
    fixes = table.split("Fixes, r3:")[1].split("\n\n")[1].splitlines()[2:]
    assert len(fixes) == 8 and fixes[0].startswith("| p20 (seed 1) | <answer> 1 + 2 </answer> (missed_target)")
    assert fixes[0].endswith("| <answer> 3 </answer> (right) |") and "Fixes, grpo" not in table
    # seed by seed, rows with several seeds only: each r3 seed fixed 60 and broke none; of its 180 failed first
    # tries the 120 still wrong at the second try were format errors, and no reflection held an answer
    assert "| r3 | 1 | 10.0 | 40.0 | 60 | 0 | 0% of 180 | 4.0 | 67% of 180 |" in table
    assert "| r3 | 2 | 10.0 | 40.0 | 60 | 0 |" in table and "| grpo | 2 | 10.0 | 10.0 | 0 | 0 |" in table
    assert "| start | 0 |" not in table and "| base model | 0 |" not in table


def test_repeat_and_new_candidate_columns_and_several_pairs(tmp_path, capsys):
    """Of 4 failed first tries ("1 + 2"): retries "1 + 2" (word for word), "2+1" (equivalent), "1 * 2" and
    no answer; reflections "try 1 * 2" (a new candidate), "1 + 2" (the same one), and two without one."""
    evals, runs = tmp_path / "evals", tmp_path / "runs"
    evals.mkdir()
    retries = ["<answer> 1 + 2 </answer>", "<answer>2+1</answer>", "<answer> 1 * 2 </answer>", "no idea"]
    reflections = ["try 1 * 2", "it was 1 + 2", "think again", "use other numbers"]
    for run in ("a-s1", "b-s1"):
        (runs / run / "ckpt-000001" / "adapter").mkdir(parents=True)
        step = {"step": 1, "kind": "train", "solved": 0.5, "signal_frac": 1.0, "tokens_total": 1000}
        r3 = [{**step, "phase": "r3", "solved": solved, "attempt_solved": fresh, "repeat_frac": 0.25}
              for solved, fresh in ((0.0, 0.5), (0.5, 1.0))] if run == "a-s1" else [step]  # b: no fresh first tries
        (runs / run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in r3))
        lines = [json.dumps({"config": {"adapter": str(runs / run / "ckpt-000001/adapter"), "task": "countdown"}})]
        for i, (retry, reflection) in enumerate(zip(retries, reflections)):
            lines.append(json.dumps({"id": f"p{i}", "t1": {"correct": False, "error": "missed_target",
                                                         "text": "<answer> 1 + 2 </answer>"},
                                     "t2": {"correct": False, "error": "x", "text": retry},
                                     "reflection": {"text": reflection}}))
        (evals / f"results-{run}.jsonl").write_text("\n".join(lines) + "\n")
    report.main(["--evals", str(evals), "--runs", str(runs), "--out", str(tmp_path / "out"), "--bootstrap", "50",
                 "--compare", "a,b;b,a"])
    table = (tmp_path / "out.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| a | "))
    assert row.split(" | ")[7:10] == ["25% of 4", "50% of 4", "25% of 4"]
    # an answer in the reflection, new or the first try's again ("try 1 * 2", "it was 1 + 2"), or only words
    assert [report.holds_answer("countdown")({"reflection": {"text": t}}) for t in reflections] == \
        [True, True, False, False] and not report.holds_answer("countdown")({"reflection": None})
    assert "a − b, acc@t2: +0.0 points" in table and "b − a, acc@t2: +0.0 points" in table
    # training: a's retries passed 25% of the time against 75% for fresh first tries of the same queries
    assert "| a | 2 | 25.0% | 75.0% | 25% |" in table and "| b | " not in table.split("Training, R3 steps")[1]
    # --curves: the PNG draws the arms named (it says which), not every arm
    report.main(["--evals", str(evals), "--runs", str(runs), "--out", str(tmp_path / "out"), "--bootstrap", "50",
                 "--curves", "b"])
    assert "out.png: curves of b\n" in capsys.readouterr().out


def test_interval_is_the_middle_95_percent():
    lo, hi = report.interval(list(range(1001)))
    assert (lo, hi) == (25, 975)


def test_seed_band_is_the_mean_of_the_seeds_on_their_common_tokens():
    # two seeds whose steps land at different token counts; smoothing off to check the arithmetic
    report.SMOOTH, smooth = 1, report.SMOOTH
    try:
        grid, mean, lo, hi = report.seed_band([([0, 100, 200], [0.0, 1.0, 2.0]), ([0, 50, 150], [1.0, 1.5, 2.5])],
                                              points=4)
    finally:
        report.SMOOTH = smooth
    assert list(grid) == [0, 50, 100, 150]  # stops where the shorter seed stops
    assert [round(v, 6) for v in mean] == [0.5, 1.0, 1.5, 2.0] and list(lo) == [0.0, 0.5, 1.0, 1.5]
    assert list(hi) == [1.0, 1.5, 2.0, 2.5]


def test_a_row_evaluated_twice_counts_once_from_its_newest_file(tmp_path, capsys):
    """eval.py writes a new results file when its code changes: the report reads the newest, not both."""
    import os
    evals, runs = tmp_path / "evals", tmp_path / "runs"
    evals.mkdir()
    (runs / "grpo-s1" / "ckpt-000001" / "adapter").mkdir(parents=True)
    adapter = str(runs / "grpo-s1/ckpt-000001/adapter")
    write_eval(evals, "zz-old", adapter, [(False, False)] * 10)  # sorts after the new one by name
    write_eval(evals, "aa-new", adapter, [(i < 5, i < 5) for i in range(10)])
    write_eval(evals, "zz-base-old", None, [(False, False)] * 10)
    write_eval(evals, "aa-base-new", None, [(False, False)] * 4)
    for name, when in (("zz-old", 1), ("aa-new", 2), ("zz-base-old", 1), ("aa-base-new", 2)):
        os.utime(evals / f"results-{name}.jsonl", (when, when))
    rows = report.read_evals(evals, runs)
    assert sum(t1 for t1, _ in rows["grpo"][1].values()) == 5
    assert len(rows["base model"][0]) == 4 and len(report.RECORDS["base model"][0]) == 4
    assert "using results-aa-new.jsonl" in capsys.readouterr().out


def test_per_seed_row_counts_fixes_breaks_and_what_the_failed_first_tries_led_to():
    """p0 right then broken, p1 fixed after a reflection holding an answer, p2 still wrong after words."""
    def record(i, t1, t2, error, reflection, tokens):
        return {"id": f"p{i}", "t1": {"correct": t1, "text": "<answer> 1 + 2 </answer>"},
                "t2": {"correct": t2, "error": error, "text": ""}, "reflection": {"text": reflection, "tokens": tokens}}
    report.RECORDS["x"], report.TASK["x"] = {3: [record(0, True, False, "missed_target", "", 0),
                                                record(1, False, True, None, "<answer> 2 + 1 </answer>", 10),
                                                record(2, False, False, "format", "no idea", 30)]}, "countdown"
    outcomes = {"p0": (True, False), "p1": (False, True), "p2": (False, False)}
    assert report.per_seed_row("x", 3, outcomes, ["p0", "p1", "p2"]) == \
        "| x | 3 | 33.3 | 33.3 | 1 | 1 | 50% of 2 | 20.0 | 50% of 2 |"
    # a problem outside the common set (another row lacks it) is left out of every column
    assert report.per_seed_row("x", 3, outcomes, ["p0", "p1"]) == \
        "| x | 3 | 50.0 | 50.0 | 1 | 1 | 100% of 1 | 10.0 | 0% of 1 |"


def test_an_eval_made_in_another_checkout_finds_its_run_by_name(tmp_path):
    """Results unpacked from an archive name their adapter by the path it had where they were made: the run
    is matched by the runs directory's name and a run of that name here; another runs directory is not."""
    evals, runs = tmp_path / "evals", tmp_path / "here" / "r3-vs-grpo"
    evals.mkdir()
    (runs / "grpo-s2" / "ckpt-000001" / "adapter").mkdir(parents=True)
    write_eval(evals, "moved", "/elsewhere/r3-vs-grpo/grpo-s2/ckpt-000001/adapter", [(True, True)] * 3)
    write_eval(evals, "other-dir", "/elsewhere/other-runs/grpo-s3/ckpt-000001/adapter", [(True, True)] * 3)
    write_eval(evals, "no-such-run", "/elsewhere/r3-vs-grpo/r3-s1/ckpt-000001/adapter", [(True, True)] * 3)
    rows = report.read_evals(evals, runs)
    assert set(rows) == {"grpo"} and set(rows["grpo"]) == {2} and len(rows["grpo"][2]) == 3


def experiment_arms() -> list[str]:
    """The arm names of examples/r3_vs_grpo.sh's `flags` case statement."""
    return re.findall(r"^        ([a-z0-9-]+)\)", (ROOT / "examples/r3_vs_grpo.sh").read_text(), re.M)


@pytest.mark.parametrize("arm", experiment_arms())
def test_an_experiment_arm_does_not_depend_on_the_embedded_recipe(arm, tmp_path, monkeypatch):
    """Each arm spells out every R3 choice and the micro-batch cap, so its runs in docs/ are what the script
    trains however config.EMBEDDED_COUNTDOWN changes (on 2026-12-07 it gained six R3 settings)."""
    import config
    import train_r3
    (tmp_path / "start").mkdir()
    (tmp_path / "start" / "adapter_config.json").write_text("{}")  # --init-adapter is checked at parse time
    done = subprocess.run(["bash", str(ROOT / "examples/r3_vs_grpo.sh"), "--flags", arm], capture_output=True,
                          text=True, env={**os.environ, "OUT": str(tmp_path)}, timeout=60)
    assert done.returncode == 0, done.stderr
    flags = done.stdout.split()
    assert "--method" in flags and str(tmp_path / "start") in flags

    def parsed(recipe: dict) -> dict:
        monkeypatch.setattr(config, "EMBEDDED_COUNTDOWN", recipe)
        args = vars(train_r3.parse_args(flags))
        args.pop("preset_flags")
        return args
    recipe = dict(config.EMBEDDED_COUNTDOWN)
    without = {k: v for k, v in recipe.items() if k not in config.R3_ONLY and k != "micro_batch_tokens"}
    without["refresh_failures"] = recipe["refresh_failures"] + 1  # --help names it: changed, not dropped
    assert parsed(recipe) == parsed(without)


def test_the_experiment_script_refuses_an_unknown_arm_for_flags():
    done = subprocess.run(["bash", str(ROOT / "examples/r3_vs_grpo.sh"), "--flags", "nope"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "unknown arm 'nope'" in done.stderr and not done.stdout


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.sh")))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_an_example_script_prints_its_header_for_help_and_runs_nothing(script, flag, tmp_path):
    """`--help` once started the whole 2-hour experiment (2026-12-07); now it prints the script's header."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "python").write_text("#!/bin/sh\necho python ran >&2\nexit 1\n")  # any training or eval would show
    (stub / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{stub}:{os.environ['PATH']}", "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(ROOT / "examples" / script), flag], capture_output=True, text=True,
                          env=env, timeout=60)
    header = (ROOT / "examples" / script).read_text().splitlines()[1].lstrip("# ")
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines()[0] == header and "set -euo" not in done.stdout
    assert not (tmp_path / "out").exists()


def test_the_experiment_script_wants_an_arm_after_flags():
    done = subprocess.run(["bash", str(ROOT / "examples/r3_vs_grpo.sh"), "--flags"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and done.stderr == "examples/r3_vs_grpo.sh: --flags needs an arm (see --help)\n"


def test_the_experiment_script_refuses_an_unknown_argument(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "examples/r3_vs_grpo.sh"), "--seeds", "1"], capture_output=True,
                          text=True, env={**os.environ, "OUT": str(tmp_path / "out")}, timeout=60)
    assert done.returncode == 2 and "unknown argument '--seeds'" in done.stderr and not done.stdout
    assert len(done.stderr.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_the_experiment_script_queues_each_arm_as_one_command(tmp_path):
    """The whole script with a stand-in `python` that records its arguments: each run gets its arm's flags and
    its seed in one call. $R3 on two lines once split every R3 arm's queue line in two (2026-12-07): the
    runs trained the embedded recipe at seed 0, and the shell said `--failure-credit: command not found`."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "python").write_text('#!/bin/sh\necho "$*" >> "$CALLS"\n'
                                 'while [ $# -gt 0 ]; do [ "$1" = --out-dir ] && mkdir -p "$2"; shift; done\n')
    (stub / "python").chmod(0o755)
    calls = tmp_path / "calls"
    env = {**os.environ, "PATH": f"{stub}:{os.environ['PATH']}", "CALLS": str(calls), "OUT": str(tmp_path / "runs"),
           "EVALS": str(tmp_path / "evals"), "REPORT": str(tmp_path / "report"), "ARMS": "r3-nearmiss grpo",
           "SEEDS": "4", "JOBS": "1"}
    done = subprocess.run(["bash", str(ROOT / "examples/r3_vs_grpo.sh")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0 and "not found" not in done.stderr, done.stderr
    trained = {line.split("--out-dir ")[1].split()[0]: line.split() for line in calls.read_text().splitlines()
               if line.startswith("train_r3.py")}
    assert sorted(os.path.basename(run) for run in trained) == ["grpo-s4", "r3-nearmiss-s4", "start"]
    for run, argv in trained.items():
        seed = argv[len(argv) - 1 - argv[::-1].index("--seed") + 1]  # the last --seed given wins
        assert seed == ("0" if run.endswith("start") else "4")
    r3 = trained[str(tmp_path / "runs" / "r3-nearmiss-s4")]
    assert r3[len(r3) - 1 - r3[::-1].index("--failure-credit") + 1] == "0.5" and "--no-train-retries" in r3
