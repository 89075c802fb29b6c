"""The papers' evaluation: two tries on the held-out split, error analysis, and training-curve plots.

    python eval.py --task countdown --n 100                                         # the base model
    python eval.py --task countdown --n 100 --adapter runs/countdown-r3 --compare   # base | trained, one table
    python eval.py --task math --method score --adapter runs/math-score             # SCoRe's second try
    python eval.py --plot runs/countdown-r3/metrics.jsonl                           # -> runs/countdown-r3/metrics.png
    python eval.py --plot runs/s1/metrics.jsonl runs/s2/metrics.jsonl --plot-out seeds.png   # mean, min-max band

First try on every example, then the second try. r3: a failed first try is followed by a reflection
and a retry (a passed one stands); score: the fixed correction instruction on every example, with no
feedback. Greedy unless --temperature > 0. Reported: accuracy@t1, accuracy@t2, delta = acc@t2 - acc@t1,
delta i->c (wrong at t1, right at t2) and c->i (SCoRe's metrics), the verifier's error categories at
each try (R3's error analysis), mean tokens of the answer standing after each try, mean reflection
tokens, wall time and generated tokens per second.

Files in --out: results-<hash>.jsonl, a header line {"config": ...} then one line per finished example,
named by a hash of everything that decides the results (model, adapter and its weights, task, source,
n, method, temperature, token limits, seed, and the code of the prompts, verifiers and sampler); rerun
with the same flags and code, a killed eval redoes only the missing examples, while an edited prompt or
verifier starts a new file. summary-<hash>.json and summary-<hash>.md hold the table.
"""
import argparse
import contextlib
import hashlib
import json
import os
import time
from collections import Counter
from pathlib import Path

import cli
import tasks

TRIES = ("t1", "t2")
DEFAULT_R3 = {"reflect_prompt": "approach", "retry_context": "conversation"}  # how r3's second try is asked for


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="countdown", choices=tasks.TASK_NAMES)
    p.add_argument("--source", default=None, help=f"task data (defaults: {tasks.DEFAULT_SOURCE})")
    p.add_argument("--model", default="smollm2-135m", help="embedded model, Hub id, local dir or .gguf file")
    p.add_argument("--adapter", default=None, help="a run directory (its latest checkpoint) or an adapter directory")
    p.add_argument("--compare", action="store_true", help="base model and --adapter side by side, same examples")
    p.add_argument("--4bit", dest="load_in_4bit", action="store_true", help="NF4 4-bit base weights, as training "
                   "with --4bit (on by itself for an adapter whose run was trained so: the policy it learned)")
    p.add_argument("--n", type=int, default=500,
                   help="held-out examples (the first n of the test split; at least 1)")
    p.add_argument("--method", default="r3", choices=["r3", "score"], help="how the second try is asked for")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the papers' evaluation); >= 0 and finite")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="answer length (default: per task, as training; at least 1)")
    p.add_argument("--reflect-tokens", type=int, default=64, help="reflection length (r3)")
    p.add_argument("--reflect-prompt", default=None, choices=sorted(tasks.REFLECT_PROMPTS), help="what the reflection "
                   "is asked for (r3; train_r3.py --help). Default: as the adapter's run was trained, else approach")
    p.add_argument("--retry-context", default=None, choices=tasks.RETRY_CONTEXTS, help="what the retry sees (r3; "
                   "train_r3.py --help). Default: as the adapter's run was trained, else conversation")
    p.add_argument("--batch-size", type=int, default=64,
                   help="examples per chunk (sampled together, then saved; at least 1); wide batches decode "
                        "faster per token")
    p.add_argument("--out", default="evals", help="directory for results and summaries (must be writable)")
    p.add_argument("--seed", type=int, default=0, help="test-split order and sampling seed")
    p.add_argument("--plot", default=None, nargs="+", metavar="METRICS_JSONL",
                   help="plot a training run's metrics instead; several files (seeds of one setting): their mean "
                        "and min-max band")
    p.add_argument("--plot-out", default=None, help="PNG path (default: the first metrics file with .png)")
    args = p.parse_args(argv)
    cli.check_not_empty(p, args)  # --out "" or --plot "" would silently mean the default
    return args


# ---------------------------------------------------------------------------------------------- the table

def count_errors(records: list[dict], t: str) -> dict:
    return dict(sorted(Counter(r[t]["error"] or "unknown" for r in records if not r[t]["correct"]).items()))


def summarize(records: list[dict]) -> dict:
    """The table's numbers from per-example records (fractions, not percents)."""
    n = len(records)
    frac = lambda k: k / n if n else 0.0  # noqa: E731
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    right = {t: sum(bool(r[t]["correct"]) for r in records) for t in TRIES}
    wall, generated = sum(r["seconds"] for r in records), sum(r["gen_tokens"] for r in records)
    return {"n": n, "acc_t1": frac(right["t1"]), "acc_t2": frac(right["t2"]),
            "delta": frac(right["t2"] - right["t1"]),
            "delta_i2c": frac(sum(not r["t1"]["correct"] and r["t2"]["correct"] for r in records)),
            "delta_c2i": frac(sum(r["t1"]["correct"] and not r["t2"]["correct"] for r in records)),
            "errors_t1": count_errors(records, "t1"), "errors_t2": count_errors(records, "t2"),
            "tokens_t1": mean([r["t1"]["tokens"] for r in records]),
            "tokens_t2": mean([r["t2"]["tokens"] for r in records]),
            "tokens_reflection": mean([r["reflection"]["tokens"] for r in records if r.get("reflection")]),
            "gen_tokens": generated, "wall_s": wall, "tokens_per_s": generated / wall if wall > 0 else 0.0}


def markdown_table(columns: dict[str, dict]) -> str:
    """One column per summary (e.g. base | trained), one row per metric; accuracies in percent."""
    pct, signed = (lambda x: f"{100 * x:.1f}"), (lambda x: f"{100 * x:+.1f}")
    one, num = (lambda x: f"{x:.1f}"), (lambda x: str(x))
    rows = [("examples", "n", num), ("accuracy@t1 (%)", "acc_t1", pct), ("accuracy@t2 (%)", "acc_t2", pct),
            ("Δ(t1,t2) (%)", "delta", signed), ("Δ i→c (%)", "delta_i2c", pct), ("Δ c→i (%)", "delta_c2i", pct)]
    for t in TRIES:
        for cat in sorted(set().union(*(s[f"errors_{t}"] for s in columns.values()))):
            rows.append((f"errors@{t}: {cat}", (f"errors_{t}", cat), num))
    rows += [("tokens/answer t1", "tokens_t1", one), ("tokens/answer t2", "tokens_t2", one),
             ("tokens/reflection", "tokens_reflection", one), ("wall time (s)", "wall_s", one),
             ("tokens/s", "tokens_per_s", one)]
    get = lambda s, key: s[key[0]].get(key[1], 0) if isinstance(key, tuple) else s[key]  # noqa: E731
    lines = ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(fmt(get(s, key)) for s in columns.values()) + " |"
              for label, key, fmt in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- results file

def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


# The code that decides an example's result: its prompts, its verifier, the sampler and these two tries.
# Their bytes go into the results file's name, so a fork that edits a prompt never reads stale results.
RESULT_CODE = ("tasks.py", "verifiers.py", "math_equiv.py", "tool_calls.py", "sandbox.py", "rollout.py",
               "sample.py", "decode.py", "eval.py")


def files_hash(paths) -> str:
    """sha256 of the files' bytes, in the given order (12 hex digits)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:12]


def read_results(path: Path) -> dict[str, dict]:
    """Finished records by example id. A half-written last line (a kill mid-write) is dropped, and the
    file rewritten without it so later appends start on a line of their own."""
    if not path.exists():
        return {}
    text = path.read_text()
    lines, good, done = text.splitlines(), [], {}
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            if i == len(lines) - 1:
                break
            raise cli.UsageError(f"{path}:{i + 1}: malformed results line; delete the file to start over")
        good.append(line)
        if "id" in row:
            done[row["id"]] = row
    if len(good) < len(lines) or not text.endswith("\n"):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in good))
        os.replace(tmp, path)
    return done


def turn_record(turn, new: bool = True) -> dict:
    v = turn.verdict
    return {"correct": v.correct, "error": v.error, "tokens": len(turn.ids), "text": turn.text, "new": new}


# ---------------------------------------------------------------------------------------------- running

def run_column(model, tok, examples: list[dict], config: dict, out: Path, batch_size: int, label: str) -> list[dict]:
    """Both tries on every example not already in the results file, a chunk at a time; all records."""
    import rollout
    from rollout import Gen
    path = out / f"results-{config_hash(config)}.jsonl"
    done = read_results(path)
    if not path.exists():
        path.write_text(json.dumps({"config": config}) + "\n")
    bar = cli.bar(total=len(examples), initial=sum(ex["id"] in done for ex in examples), desc=label, unit="ex")
    with rollout.progress(f"{label}: sampling", leave=False):  # a token bar under the example bar
        for start in range(0, len(examples), batch_size):
            chunk = [ex for ex in examples[start:start + batch_size] if ex["id"] not in done]
            if not chunk:
                continue
            t0 = time.perf_counter()
            seed, temp = config["seed"] * 1_000_003 + start, config["temperature"]
            answer = Gen(config["max_new_tokens"], temp, seed=seed, batch_size=batch_size)
            reflect = Gen(config["reflect_tokens"], temp, seed=seed + 1, batch_size=batch_size)
            retry = Gen(config["max_new_tokens"], temp, seed=seed + 2, batch_size=batch_size)
            # keep=True: the second try continues the first's cache
            first = rollout.attempt(model, tok, config["task"], chunk, answer, keep=True)
            second, reflections = rollout.second_try(model, tok, config["task"], chunk, first, config["method"],
                                                     answer, reflect, retry, config.get("reflect_prompt", "approach"),
                                                     config.get("retry_context", "conversation"))
            seconds = (time.perf_counter() - t0) / len(chunk)
            rows = []
            for ex, a, b, r in zip(chunk, first, second, reflections):
                new = b is not a
                rows.append({"id": ex["id"], "t1": turn_record(a), "t2": turn_record(b, new),
                             "reflection": r and {"tokens": len(r.ids), "text": r.text},
                             "gen_tokens": len(a.ids) + (len(b.ids) if new else 0) + (len(r.ids) if r else 0),
                             "seconds": seconds})
            with open(path, "a") as f:  # one write per chunk: a kill leaves at most one half-written line
                f.write("".join(json.dumps(row) + "\n" for row in rows))
            done.update((row["id"], row) for row in rows)
            bar.update(len(chunk))
            cli.progress_line(f"{label}: {sum(ex['id'] in done for ex in examples)}/{len(examples)} examples, "
                              f"{seconds * len(chunk):.1f} s for the last {len(chunk)}")
    bar.close()
    return [done[ex["id"]] for ex in examples]


def trained_with(adapter: Path) -> dict:
    """The flags this adapter (<run>/ckpt-N/adapter) was trained with, as its run's args.json holds them
    (strings); {} for an adapter outside a run."""
    for run in (adapter.parent.parent, adapter.parent):
        try:
            flags = json.loads((run / "args.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(flags, dict):
            return flags
    return {}


def validate(args):
    """Flags no evaluation could use, and an --out that cannot be written: one line before any work."""
    if args.plot:
        return
    cli.check_flags([("--n", args.n, args.n >= 1, "at least 1"),
                     ("--batch-size", args.batch_size, args.batch_size >= 1, "at least 1"),
                     ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens is None or args.max_new_tokens >= 1,
                      "at least 1"),
                     ("--reflect-tokens", args.reflect_tokens, args.reflect_tokens >= 1, "at least 1"),
                     ("--temperature", args.temperature, args.temperature >= 0, ">= 0")])
    if args.method == "score" and (args.reflect_prompt is not None or args.retry_context is not None):
        raise cli.UsageError("--reflect-prompt and --retry-context are r3's: --method score's second try has no "
                             "reflection")
    cli.writable_dir(args.out, "--out")


def main(argv=None):
    args = parse_args(argv)
    if args.plot:
        return plot([Path(p) for p in args.plot], Path(args.plot_out) if args.plot_out else None)
    from model import load_model, resolve_adapter
    adapter = resolve_adapter(args.adapter) if args.adapter else None
    if args.compare and adapter is None:
        raise cli.UsageError("--compare needs --adapter (a run directory or an adapter directory)")
    validate(args)
    trained = trained_with(adapter) if adapter is not None else {}
    if not args.load_in_4bit and trained.get("load_in_4bit") == "True":
        args.load_in_4bit = True
        print(f"eval: {adapter} was trained on a 4-bit base (its run's args.json): scoring it with --4bit, as trained")
    for flag, choices in (("reflect_prompt", tasks.REFLECT_PROMPTS), ("retry_context", tasks.RETRY_CONTEXTS)):
        if getattr(args, flag) is None:  # the policy is asked for its second tries as it learned to write them
            setattr(args, flag, trained.get(flag) if trained.get(flag) in choices else DEFAULT_R3[flag])
            if getattr(args, flag) != DEFAULT_R3[flag] and args.method == "r3":
                print(f"eval: {adapter} was trained with --{flag.replace('_', '-')} {getattr(args, flag)} (its run's "
                      "args.json): asking for its second tries so")
    from loop import TASK_TOKENS, fit_context
    examples = tasks.load_examples(args.task, "test", source=args.source, n=args.n, seed=args.seed)
    if not examples:
        raise cli.UsageError(f"no held-out examples for {args.task} from {args.source or 'the default source'}")
    model, tok = load_model(args.model, adapter=str(adapter) if adapter else None, load_in_4bit=args.load_in_4bit)
    model.eval()
    args.max_new_tokens = args.max_new_tokens or TASK_TOKENS[args.task]
    examples = fit_context(model, tok, args, examples, "eval", mode=args.method)
    out = Path(args.out)
    base = {"model": args.model, "adapter": None, "task": args.task,
            "source": args.source or tasks.DEFAULT_SOURCE[args.task], "n": args.n, "method": args.method,
            "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
            "reflect_tokens": args.reflect_tokens, "seed": args.seed,
            "code": files_hash(Path(__file__).parent / name for name in RESULT_CODE),
            **({"load_in_4bit": True} if args.load_in_4bit else {}),  # absent when off: older files keep their names
            **{flag: getattr(args, flag) for flag in DEFAULT_R3  # absent when default, as load_in_4bit
               if args.method == "r3" and getattr(args, flag) != DEFAULT_R3[flag]}}
    configs = {}
    if adapter is None or args.compare:
        configs["base"] = base
    if adapter is not None:  # its weights too: a run directory retrained from scratch keeps its paths
        configs["trained"] = {**base, "adapter": str(adapter),
                              "adapter_weights": files_hash(sorted(Path(adapter).glob("adapter_*")))}
    columns = {}
    for label, config in configs.items():
        off = model.disable_adapter() if adapter is not None and config["adapter"] is None else contextlib.nullcontext()
        with off:
            columns[label] = summarize(run_column(model, tok, examples, config, out, args.batch_size, label))
    table = markdown_table(columns)
    caption = (f"{args.task} ({base['source']}, {len(examples)} held-out examples), method {args.method}, "
               f"model {args.model}" + (" (4-bit NF4)" if args.load_in_4bit else "") +
               (f", adapter {adapter}" if adapter else "") +
               "".join(f", --{flag.replace('_', '-')} {base[flag]}" for flag in DEFAULT_R3 if flag in base) +
               f", temperature {args.temperature}")
    stem = out / f"summary-{config_hash(configs)}"
    stem.with_suffix(".json").write_text(json.dumps(
        {"configs": configs, "columns": columns,
         "results": {k: str(out / f"results-{config_hash(c)}.jsonl") for k, c in configs.items()}}, indent=1))
    stem.with_suffix(".md").write_text(f"{caption}\n\n{table}\n")
    print(f"\n{caption}\n\n{table}\n\nsaved {stem}.json and {stem}.md")
    return columns


# ---------------------------------------------------------------------------------------------- plots

PANELS = (("reward (train)", ("reward",)), ("accuracy (eval)", ("acc_t1", "acc_t2")),
          ("KL to base", ("kl",)), ("signal fraction", ("signal_frac",)))


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's lines in step order; where a resumed run repeated a step, the later line wins."""
    if not path.is_file():
        raise cli.UsageError(f"metrics file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise cli.UsageError(f"{path}: cannot read the metrics file ({e.strerror or e})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:  # random bytes, or a binary file given by mistake
        raise cli.UsageError(f"{path}:{raw[:e.start].count(10) + 1}: not UTF-8 text, so not a metrics file")
    by_step = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # not JSON, an integer too long to parse, nested too deeply
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise cli.UsageError(f"{path}:{i}: not a metrics line (a JSON object with an integer \"step\")")
        by_step[row["step"]] = row
    if not by_step:
        raise cli.UsageError(f"{path}: no metrics lines")
    return [by_step[s] for s in sorted(by_step)]


SMOOTH = 5  # steps in the rolling mean of the training curves (a step's reward is a mean of ~16 samples)


def rolling_mean(ys: list[float], window: int = SMOOTH) -> list[float]:
    """The mean of each point and the window - 1 before it (fewer at the start): light smoothing that
    never looks ahead, so a curve does not move before the run did."""
    return [sum(ys[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(ys))]


def seed_mean(runs_rows: list[list[dict]], key: str):
    """Steps where every run has key, the runs' mean there, and the min and max over runs."""
    values = [{r["step"]: r[key] for r in rows if isinstance(r.get(key), (int, float))} for rows in runs_rows]
    steps = sorted(set.intersection(*(set(v) for v in values)))
    per_step = [[v[s] for v in values] for s in steps]
    return steps, [sum(x) / len(x) for x in per_step], [min(x) for x in per_step], [max(x) for x in per_step]


def phase_cuts(rows: list[dict]) -> list[tuple[int, str, str]]:
    """(last step, phase, next phase) where a run's phase changes (warm-up -> r3)."""
    train = [r for r in rows if r.get("kind") == "train" and r.get("phase")]
    return [(a["step"], a["phase"], b["phase"]) for a, b in zip(train, train[1:]) if a["phase"] != b["phase"]]


def plot(paths: list[Path], out: Path | None = None) -> Path:
    """Training curves of one run, or of several seeds of one setting (their mean, and a band from the
    lowest to the highest seed). Per-step training numbers are noisy (a step's reward is a mean of ~16
    samples): drawn faint, with a rolling mean over SMOOTH steps on top, restarted where the phase changes
    (a warm-up's reward is the first attempt's, R3's the retry's: different quantities). The held-out
    accuracies (a few evals) are drawn as they are, with markers."""
    runs_rows = [read_metrics(p) for p in paths]
    out = cli.writable_file(out or paths[0].with_suffix(".png"), "--plot-out")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    several, cuts = len(runs_rows) > 1, phase_cuts(runs_rows[0])
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for n, key in enumerate(keys):
            steps, mean, lo, hi = seed_mean(runs_rows, key)
            if not steps:
                continue
            color, name = f"C{n}", key + (f", mean of {len(runs_rows)} runs" if several else "")
            if several:
                ax.fill_between(steps, lo, hi, color=color, alpha=0.2, linewidth=0, label=f"{key}, lowest to highest run")
            if key.startswith("acc"):
                ax.plot(steps, mean, color=color, marker="os"[n % 2], markersize=4 + 2 * (n % 2), label=name,
                        linestyle="-" if n == 0 else "--", markerfacecolor="none" if n else color)  # t2 = t1 stays visible
                continue
            ax.plot(steps, mean, color=color, alpha=0.35, linewidth=1, label=f"{name}, per step")
            bounds = [0] + [k + 1 for k, s in enumerate(steps[:-1]) if s in {c[0] for c in cuts}] + [len(steps)]
            for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
                ax.plot(steps[a:b], rolling_mean(mean[a:b]), color=color, linewidth=2,
                        label=f"{name}, mean of the last {SMOOTH} steps" if k == 0 else None)
        for step, _, _ in cuts:
            ax.axvline(step + 0.5, color="grey", linestyle=":", linewidth=1)
        if ax.lines:
            ax.legend(fontsize=7)
        else:  # e.g. no held-out eval (--eval-every 0): say so, rather than leave a blank panel
            ax.text(0.5, 0.5, f"no {' / '.join(keys)} in the metrics", ha="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step" + ("".join(f"   (dotted: {a} -> {b} after step {s})" for s, a, b in cuts)))
    fig.suptitle(", ".join(str(p) for p in paths))
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=120)
    except OSError as e:
        raise cli.UsageError(f"--plot-out {out}: cannot write it ({e.strerror or e})")
    plt.close(fig)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    cli.run(main)
