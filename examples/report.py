"""The R3-vs-GRPO table and plot from eval.py's per-example results and the runs' metrics.

    python examples/report.py --evals evals/r3-vs-grpo --runs runs/r3-vs-grpo --out docs/r3_vs_grpo

Rows: the base model, the starting adapter, and each arm (a run directory name up to "-s<seed>", its
seeds pooled). Every row is scored on the same held-out problems. 95% confidence intervals come from a
bootstrap that resamples problems and, for arms with several seeds, seeds; the arm-vs-arm difference
resamples the problems once for both arms (they saw the same problems), seeds separately. Rows with
several seeds also get one line per seed: its fixes and breaks, and what its reflections were.
"""
import argparse
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import eval as ev  # noqa: E402  (its rolling mean, the one eval.py --plot draws)
import verifiers  # noqa: E402

METRICS = (("acc@t1", lambda t1, t2: t1), ("acc@t2", lambda t1, t2: t2), ("Δ", lambda t1, t2: t2 - t1),
           ("Δ i→c", lambda t1, t2: (not t1) and t2), ("Δ c→i", lambda t1, t2: t1 and not t2))


def read_evals(evals: Path, runs: Path) -> dict[str, dict[int, dict[str, tuple[bool, bool]]]]:
    """{row label: {seed: {problem id: (right at try 1, right at try 2)}}} from every results file. A row
    and seed evaluated more than once (eval.py's code changed, so its results went to a new file) counts
    once: the newest file."""
    rows, newest = {}, {}
    for found in (RECORDS, TASK, EVALUATED):  # what an earlier call in this process read
        found.clear()
    here = runs.resolve()
    for path in sorted(evals.glob("results-*.jsonl"), key=lambda p: (p.stat().st_mtime, p.name)):
        lines = path.read_text().splitlines()
        config = json.loads(lines[0])["config"]
        adapter = config.get("adapter")
        if adapter is None:
            label, seed = "base model", 0
        else:
            # the run directory under --runs; an eval made in another checkout (unpacked from an archive, moved)
            # matches by the runs directory's name and a run of the same name under --runs
            run = next((p for p in Path(adapter).parents if p.parent == here), None) or next(
                (p for p in Path(adapter).parents if p.parent.name == here.name and (runs / p.name).is_dir()), None)
            if run is None:
                continue
            m = re.fullmatch(r"(.+)-s(\d+)", run.name)
            label, seed = (m.group(1), int(m.group(2))) if m else (run.name, 0)
            EVALUATED.add(run.name)
        if len(lines) < 2:  # an eval that was started and stopped before its first chunk
            continue
        if (label, seed) in newest:
            print(f"report: {label} seed {seed} has results in {newest[label, seed].name} and the newer "
                  f"{path.name}: using {path.name}")
        newest[label, seed] = path
        TASK[label] = config.get("task", "countdown")
        records = [json.loads(line) for line in lines[1:]]
        RECORDS.setdefault(label, {})[seed] = records
        rows.setdefault(label, {})[seed] = {r["id"]: (bool(r["t1"]["correct"]), bool(r["t2"]["correct"]))
                                            for r in records}
    return rows


RECORDS = {}  # {label: {seed: [eval.py's per-example records]}}, for the repeats columns and the samples
TASK = {}  # {label: its evals' task}
EVALUATED = set()  # the run directories with eval results: run_metrics reads only these,
# so a run still training (not yet in the table) does not move them


def share(label: str, keep) -> str:
    """Of the label's failed first tries, the share for which keep(record) holds, and of how many."""
    return share_of([r for records in RECORDS[label].values() for r in records if not r["t1"]["correct"]], keep)


def share_of(failed: list[dict], keep) -> str:
    return f"{100.0 * sum(map(keep, failed)) / len(failed):.0f}% of {len(failed)}" if failed else "—"


def word_for_word(r: dict) -> bool:
    return r["t2"]["text"].strip() == r["t1"]["text"].strip()


def new_candidate(task: str):
    """Does the reflection name an answer (for countdown also a bare expression) other than the first try's?"""
    def keep(r: dict) -> bool:
        text = (r.get("reflection") or {}).get("text", "")
        key = verifiers.answer_key(task, text, loose=True)
        return key is not None and key != verifiers.answer_key(task, r["t1"]["text"], loose=True)
    return keep


def holds_answer(task: str):
    """Does the reflection hold an answer at all (the first try's again or another), not only words?"""
    return lambda r: verifiers.answer_key(task, (r.get("reflection") or {}).get("text", ""), loose=True) is not None


def sample_row(r: dict, seed: int | None = None) -> str:
    """One two-try record as a table row: problem (and seed), first try, reflection, retry, verdicts."""
    text = lambda s: " ".join(s.split())[:160].replace("|", "\\|")  # noqa: E731
    where = r["id"] if seed is None else f"{r['id']} (seed {seed})"
    return (f"| {where} | {text(r['t1']['text'])} ({r['t1']['error']}) | "
            f"{text((r.get('reflection') or {}).get('text', ''))} | {text(r['t2']['text'])} "
            f"({'right' if r['t2']['correct'] else r['t2']['error']}) |")


def samples(label: str, k: int = 4) -> list[str]:
    """The first k failed first tries of the label's lowest seed: first try, reflection, retry, verdicts."""
    seed = min(RECORDS[label])
    return [sample_row(r) for r in [r for r in RECORDS[label][seed] if not r["t1"]["correct"]][:k]]


def fixes(label: str, k: int = 8) -> list[str]:
    """Up to k failed first tries whose retry passed (Δ i→c), over every seed: what a fix looks like."""
    found = [(seed, r) for seed in sorted(RECORDS[label]) for r in RECORDS[label][seed]
             if not r["t1"]["correct"] and r["t2"]["correct"]]
    return [sample_row(r, seed) for seed, r in found[:k]]


def score(seeds: dict[int, dict], ids: list[str], pick_seeds: list[int], pick_ids: list[int]) -> dict[str, float]:
    """Each metric's mean over the chosen seeds and problems (with repeats: a bootstrap sample)."""
    out = {}
    for name, fn in METRICS:
        total = sum(fn(*seeds[s][ids[i]]) for s in pick_seeds for i in pick_ids)
        out[name] = 100.0 * total / (len(pick_seeds) * len(pick_ids))
    return out


def bootstrap(arms: list[dict], ids: list[str], n_boot: int, rng: random.Random):
    """n_boot resamples: problems drawn once per resample and shared by all arms, seeds per arm."""
    draws = []
    for _ in range(n_boot):
        pick_ids = [rng.randrange(len(ids)) for _ in ids]
        draws.append([score(a, ids, [rng.choice(sorted(a)) for _ in a], pick_ids) for a in arms])
    return draws


def interval(values: list[float]) -> tuple[float, float]:
    v = sorted(values)
    return v[int(0.025 * (len(v) - 1))], v[int(0.975 * (len(v) - 1))]


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--evals", required=True, help="eval.py's --out directory")
    p.add_argument("--runs", required=True, help="the directory holding the runs (start, r3-s1, grpo-s1, ...)")
    p.add_argument("--out", required=True, help="output prefix: writes <out>.md and <out>.png")
    p.add_argument("--order", default="base model,start,r3,grpo,score,rerest", help="row order (labels)")
    p.add_argument("--compare", default="r3,grpo", help="pairs of arms whose acc@t1 and acc@t2 differences get "
                   "an interval, ';' between pairs: 'r3-repeat0,grpo;r3-repeat0,r3'")
    p.add_argument("--curves", default=None, help="the arms drawn in the PNG, ',' between labels (default: every "
                   "arm; a dozen arms crowd the plot)")
    p.add_argument("--bootstrap", type=int, default=2000)
    args = p.parse_args(argv)
    evals, runs, out = Path(args.evals), Path(args.runs), Path(args.out)
    rows = read_evals(evals, runs)
    if not rows:
        raise cli.UsageError(f"{evals}: no eval results of runs in {runs}")
    ids = sorted(set.intersection(*(set(r) for seeds in rows.values() for r in seeds.values())))
    order = [x for x in args.order.split(",") if x in rows] + sorted(set(rows) - set(args.order.split(",")))
    arms = [rows[label] for label in order]
    metrics = run_metrics(runs)  # the evaluated runs' training lines (read_evals found them)
    draws = bootstrap(arms, ids, args.bootstrap, random.Random(0))
    lines = [f"{len(ids)} held-out problems, greedy, two tries (a failed first try: reflection, then retry); "
             f"95% bootstrap intervals over problems and seeds ({args.bootstrap} resamples). Accuracies in %.", "",
             "| row | seeds | " + " | ".join(name for name, _ in METRICS) + " | retry = first try | retry repeats "
             "first try's answer | reflection names a new candidate | fixes per seed | sampled tokens |",
             "|---|---|" + "---|" * (len(METRICS) + 5)]
    for k, label in enumerate(order):
        point = score(arms[k], ids, sorted(arms[k]), list(range(len(ids))))
        cells = []
        for name, _ in METRICS:
            lo, hi = interval([d[k][name] for d in draws])
            cells.append(f"{point[name]:.1f} [{lo:.1f}, {hi:.1f}]")
        task = TASK[label]
        same = lambda r: verifiers.same_answer(task, r["t2"]["text"], r["t1"]["text"])  # noqa: E731
        lines.append(f"| {label} | {len(arms[k])} | " + " | ".join(cells) + f" | {share(label, word_for_word)} | "
                     f"{share(label, same)} | {share(label, new_candidate(task))} | {fixes_per_seed(arms[k], ids)} | "
                     f"{train_tokens(metrics.get(label, []))} |")
    pairs = [pair.split(",") for pair in args.compare.split(";")]
    for a, b in pairs:
        if a not in rows or b not in rows:
            continue
        ka, kb = order.index(a), order.index(b)
        for name in ("acc@t1", "acc@t2"):
            diff = score(arms[ka], ids, sorted(arms[ka]), list(range(len(ids))))[name] - \
                score(arms[kb], ids, sorted(arms[kb]), list(range(len(ids))))[name]
            lo, hi = interval([d[ka][name] - d[kb][name] for d in draws])
            verdict = "excludes 0" if lo > 0 or hi < 0 else "includes 0"
            lines += ["", f"{a} − {b}, {name}: {diff:+.1f} points, 95% interval [{lo:+.1f}, {hi:+.1f}] ({verdict})"]
    training = [(label, training_passes(metrics.get(label, []))) for label in order]
    if any(t for _, t in training):
        lines += ["", "Training, R3 steps with --train-attempts (mean over steps and seeds): how often a retry after a "
                  "reflection passes, against a fresh first try of the same failed queries sampled in the same step.",
                  "", "| row | R3 steps | retry passes | fresh first try passes | retry repeats the failed answer |",
                  "|---|---|---|---|---|"]
        lines += [f"| {label} | {t['steps']} | {t['retry']:.1%} | {t['fresh']:.1%} | {t['repeat']:.0%} |"
                  for label, t in training if t]
    lines += ["", "\"retry = first try\": of the failed first tries, the share whose second try repeated it word "
              "for word; \"retry repeats first try's answer\": the same or an equivalent answer "
              "(verifiers.same_answer); \"reflection names a new candidate\": the reflection holds an answer (for "
              "countdown, a tag or a bare expression) other than the first try's. \"fixes per seed\": the problems "
              "wrong at the first try and right at the second, seed by seed. \"sampled tokens\": the "
              "training run's, mean over seeds (R3: failure sets included).", ""]
    several = [label for label in order if len(rows[label]) > 1]
    if several:
        lines += ["Seed by seed (rows with several seeds): whether the gain comes from every seed, and what the "
                  "reflections of a seed that fixed nothing look like. Reflection columns: over the failed first "
                  "tries.", "", "| row | seed | acc@t1 | acc@t2 | fixes | breaks | reflection holds an "
                  "answer | reflection tokens (mean) | retry a format error |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [per_seed_row(label, seed, rows[label][seed], ids)
                  for label in several for seed in sorted(rows[label])]
        lines += [""]
    for label in [x for x in dict.fromkeys(x for pair in pairs for x in pair) if x in rows]:
        lines += [f"Samples, {label} (seed {min(RECORDS[label])}), the first failed first tries:", "",
                  "| problem | first try | reflection | retry |", "|---|---|---|---|", *samples(label), ""]
        if fixes(label):
            lines += [f"Fixes, {label}: failed first tries whose retry passed (up to 8, every seed):", "",
                      "| problem | first try | reflection | retry |", "|---|---|---|---|", *fixes(label), ""]
    table = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table)
    print(table)
    plot(metrics, order, out.with_suffix(".png"), args.curves.split(",") if args.curves else None)


def fixes_per_seed(seeds: dict[int, dict], ids: list[str]) -> str:
    """Δ i→c as counts, seed by seed ("6 / 0 / 3"): whether the arm's fixes come from every seed or a few."""
    return " / ".join(str(count_fixes(seeds[s], ids)) for s in sorted(seeds))


def count_fixes(outcomes: dict[str, tuple[bool, bool]], ids: list[str]) -> int:
    """One seed's problems wrong at the first try and right at the second."""
    return sum(not outcomes[i][0] and outcomes[i][1] for i in ids)


def per_seed_row(label: str, seed: int, outcomes: dict[str, tuple[bool, bool]], ids: list[str]) -> str:
    """One seed of a row: its accuracies, fixes and breaks, and what its reflections and retries were."""
    pct = lambda k: 100.0 * k / len(ids)  # noqa: E731
    common = set(ids)
    failed = [r for r in RECORDS[label][seed] if not r["t1"]["correct"] and r["id"] in common]
    tokens = [(r.get("reflection") or {}).get("tokens", 0) for r in failed]
    fixed = count_fixes(outcomes, ids)
    broken = sum(outcomes[i][0] and not outcomes[i][1] for i in ids)
    return (f"| {label} | {seed} | {pct(sum(outcomes[i][0] for i in ids)):.1f} | "
            f"{pct(sum(outcomes[i][1] for i in ids)):.1f} | {fixed} | {broken} | "
            f"{share_of(failed, holds_answer(TASK[label]))} | {sum(tokens) / len(tokens) if tokens else 0:.1f} | "
            f"{share_of(failed, lambda r: r['t2']['error'] == 'format')} |")


def run_metrics(runs: Path) -> dict[str, list[list[dict]]]:
    """{row label: [each evaluated run's metrics.jsonl lines, one list per seed]}, read once for the
    training columns and the curves."""
    metrics = {}
    for run in sorted(runs.iterdir()):
        if run.name in EVALUATED and (run / "metrics.jsonl").is_file():
            lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
            metrics.setdefault(re.sub(r"-s\d+$", "", run.name), []).append(lines)
    return metrics


def train_tokens(seeds: list[list[dict]]) -> str:
    """Mean sampled tokens of a row's training runs (each run's last metrics line's tokens_total)."""
    totals = [r["tokens_total"] for lines in seeds for r in lines[-1:] if "tokens_total" in r]
    return f"{sum(totals) / len(totals):,.0f}" if totals else "—"


def training_passes(seeds: list[list[dict]]) -> dict | None:
    """A row's R3 steps that also sampled fresh first tries (--train-attempts): their count and the means
    of the retries' pass rate ("solved"), the fresh first tries' ("attempt_solved") and the repeat share."""
    steps = [r for lines in seeds for r in lines
             if r.get("kind") == "train" and r.get("phase") == "r3" and "attempt_solved" in r]
    if not steps:
        return None
    mean = lambda key: sum(r[key] for r in steps) / len(steps)  # noqa: E731
    return {"steps": len(steps), "retry": mean("solved"), "fresh": mean("attempt_solved"),
            "repeat": mean("repeat_frac")}


SMOOTH = 3  # steps in each run's rolling mean (an R3 arm has only 8-9 steps per seed)


def arm_curves(metrics: dict[str, list[list[dict]]], key: str) -> dict[str, list[tuple[list[float], list[float]]]]:
    """{label: [(sampled tokens, key) per training step, one pair per seed's run]}."""
    arms = {}
    for label, seeds in metrics.items():
        for lines in seeds:
            train = [r for r in lines if r.get("kind") == "train" and "tokens_total" in r and key in r]
            if train:
                arms.setdefault(label, []).append(([r["tokens_total"] for r in train], [r[key] for r in train]))
    return arms


def seed_band(curves: list[tuple[list[float], list[float]]], points: int = 60):
    """The seeds' smoothed curves on one token grid (each seed's steps land at different token counts):
    the grid, their mean, and the lowest and highest seed. The grid stops where the shortest seed stops,
    so every point is a mean over all seeds."""
    import numpy as np
    start, stop = max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves)
    grid = np.linspace(start, stop, points) if stop > start else np.array([start])
    ys = np.array([np.interp(grid, x, ev.rolling_mean(y, SMOOTH)) for x, y in curves])
    return grid, ys.mean(0), ys.min(0), ys.max(0)


def plot(metrics: dict[str, list[list[dict]]], order: list[str], path: Path, only: list[str] | None = None):
    """Training curves against sampled tokens, one per arm: the mean over its seeds of each run's rolling
    mean over SMOOTH steps, a band from the lowest to the highest seed, and the seeds' raw steps as faint
    dots (an arm of one run: its raw steps and its rolling mean). only: the arms to draw (None: all)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    everyone = {k: v for k, v in arm_curves(metrics, "solved").items() if only is None or k in only}
    colors = {label: f"C{n}" for n, label in enumerate([x for x in order if x in everyone] +
                                                      sorted(set(everyone) - set(order)))}  # one per arm
    for ax, key, title in zip(axes, ("solved", "signal_frac", "repeat_frac"),
                              ("training: fraction of sampled answers that pass", "groups with signal",
                               "R3: retries that repeat the failed answer")):
        arms = {k: v for k, v in arm_curves(metrics, key).items() if k in everyone}
        labels = [x for x in order if x in arms] + sorted(set(arms) - set(order))
        for label in labels:
            curves, color = arms[label], colors.get(label, "C9")
            for x, y in curves:
                ax.plot(x, y, ".", color=color, alpha=0.3, markersize=4)
            grid, mean, lo, hi = seed_band(curves)
            seeds = f"mean of {len(curves)} seeds" if len(curves) > 1 else "1 run"
            ax.plot(grid, mean, color=color, linewidth=2, label=f"{label} ({seeds})")
            if len(curves) > 1:
                ax.fill_between(grid, lo, hi, color=color, alpha=0.2, linewidth=0)
        ax.set_title(title)
        ax.set_xlabel("sampled tokens")
        ax.grid(alpha=0.3)
        if labels:
            ax.legend(fontsize=8)
    fig.suptitle(f"lines: each run's mean of its last {SMOOTH} steps, averaged over seeds; bands: lowest to "
                 "highest seed; dots: single steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}: curves of {', '.join(x for x in order if x in everyone) or 'no arm'}")


if __name__ == "__main__":
    cli.run(main)
