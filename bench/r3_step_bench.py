"""Where an R3 step's time goes: first attempts (the failure set), reflections, retries, the update;
and what KV reuse (sample.REUSE) saves.

    python bench/r3_step_bench.py [--steps 3] [--warmup 1] [--rewards random] [--reuse both] [-- <train_r3.py flags>]
    python bench/r3_step_bench.py --model-config qwen2.5-1.5b --random-weights [--4bit]   # on a GPU

It runs train_r3.main itself (R3, the CPU defaults of train_r3.py unless flags after `--` say
otherwise; no eval) and times its phases from outside, by wrapping the functions the loop calls:
rollout.sample_turns (the failure set's first attempts, then per step the reflections and the
retries), rl.update, and train_r3.train_step (the whole step; "other" is the rest: verification,
advantages, bookkeeping). The first attempts run once per run, not per step; they are reported as
their own phase. Per-step phases: the median of the timed steps (after --warmup steps).

--rewards random (the default) replaces the verifier's reward with seeded random numbers, so every
group carries signal and every step runs the update (the cost measured is the full step's); with
--rewards verifier, the real verdicts (few groups with signal on this model). Tokens: sampled tokens for the
sampling phases, trained (reflection) tokens for the update. --json prints one JSON line as well.

Each sampling phase's time is split into prefill (sample.prefill: the prompt tokens) and the rest
(decoding, one token per live row per forward).

--reuse both (the default) runs the bench three times, each in its own process so that its peak memory
is its own, with the same seeds and the same failed queries (each later run samples its first attempts
too, timed, then takes the first run's failure set):
  - before: the tree of git revision --before (the code before the sampler rewrite of issue 20), reuse on;
  - now, KV reuse off, then on (sample.REUSE).
It prints them side by side with the lines "R3 step speed-up vs before: X.XX×" (before vs now, reuse on),
"R3 step speed-up from KV reuse: X.XX×" and the ceiling of any prefill saving: the reuse-off step over
the reuse-on step less its remaining prefill. --before none skips the first run. --reuse on / off: one run.
"""
import argparse
import functools
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PHASES = ("first attempts", "reflections", "retries", "update", "other")
BEFORE = "211ccf6"  # main before the sampler rewrite of issue 20


class Clock:
    """Wall time of phases, with the GPU's queue drained at each edge."""

    def __init__(self):
        import torch
        self.cuda = torch.cuda.is_available()
        self.torch = torch
        self.records = []          # (step or None, phase, seconds, tokens, of which prefill seconds)
        self.prefill_s = 0.0       # sample.prefill's time in the sampling call running now
        self.steps = []            # {"step_s": .., "peak_gb": ..}
        self.step = None           # the step running now (None: outside train_step)
        self.in_step = []          # sampling phases seen in this step, in call order

    def now(self):
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def wrap_sampling(self, fn):
        @functools.wraps(fn)
        def sample_turns(*args, **kwargs):
            t, self.prefill_s = self.now(), 0.0
            turns = fn(*args, **kwargs)
            dt = self.now() - t
            if self.step is None:
                phase = "first attempts"
            else:  # reflect_and_retry samples the reflections, then the retries
                phase = ("reflections", "retries")[min(len(self.in_step), 1)]
                self.in_step.append(phase)
            self.records.append((self.step, phase, dt, sum(len(x.ids) for x in turns), self.prefill_s))
            return turns
        return sample_turns

    def wrap_prefill(self, fn):
        """sample.prefill: the prompt tokens' forward passes (the common prefix, each row's own tokens);
        the rest of a sampling call is decoding, one token per live row per forward."""
        @functools.wraps(fn)
        def prefill(*args, **kwargs):
            t = self.now()
            out = fn(*args, **kwargs)
            self.prefill_s += self.now() - t
            return out
        return prefill

    def wrap_update(self, fn):
        @functools.wraps(fn)
        def update(model, optimizer, samples, *args, **kwargs):
            t = self.now()
            out = fn(model, optimizer, samples, *args, **kwargs)
            self.records.append((self.step, "update", self.now() - t, sum(len(s.completion_ids) for s in samples), 0.0))
            return out
        return update

    def wrap_step(self, fn):
        @functools.wraps(fn)
        def train_step(*args, **kwargs):
            if not self.steps:  # the steps' own peak RSS, without the failure set's sampling before them
                reset_peak_rss()
            self.step, self.in_step = len(self.steps), []
            if self.cuda:
                self.torch.cuda.reset_peak_memory_stats()
            t, cpu = self.now(), time.process_time()
            out = fn(*args, **kwargs)
            dt, cpu = self.now() - t, time.process_time() - cpu
            peak = self.torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None
            inside = sum(r[2] for r in self.records if r[0] == self.step)
            self.records.append((self.step, "other", dt - inside, 0, 0.0))
            self.steps.append({"step_s": dt, "cpu_s": cpu, "peak_gb": peak, "signal": out.get("signal", [])})
            self.step = None
            return out
        return train_step


def reset_peak_rss():
    """Linux: start the process's peak resident set size (VmHWM) afresh."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_gb() -> float | None:
    """Linux: the peak resident set size since the last reset_peak_rss (or the start), GiB."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20
    except (OSError, StopIteration):
        return None


def summarize(clock: Clock, warmup: int) -> dict:
    timed = list(range(warmup, len(clock.steps)))
    rows = {}
    for phase in PHASES:
        if phase == "first attempts":
            recs = [r for r in clock.records if r[1] == phase]
            secs, toks, pre = sum(r[2] for r in recs), sum(r[3] for r in recs), sum(r[4] for r in recs)
        else:
            per = [[r for r in clock.records if r[0] == s and r[1] == phase] for s in timed]
            secs = statistics.median(sum(r[2] for r in p) for p in per) if per else 0.0
            toks = statistics.median(sum(r[3] for r in p) for p in per) if per else 0
            pre = statistics.median(sum(r[4] for r in p) for p in per) if per else 0.0
        rows[phase] = {"s": secs, "tokens": toks, "tok_s": toks / secs if secs > 0 and toks else None, "prefill_s": pre}
    steps = [clock.steps[s] for s in timed]
    # a step's prefill: its reflections' and retries' (per step, then the median, like the step)
    prefill = [sum(r[4] for r in clock.records if r[0] == s) for s in timed]
    peaks = [s["peak_gb"] for s in steps if s["peak_gb"] is not None]
    signal = [x for s in steps for x in s["signal"]]
    return {"phases": rows, "step_s": statistics.median(s["step_s"] for s in steps) if steps else 0.0,
            "step_cpu_s": statistics.median(s["cpu_s"] for s in steps) if steps else 0.0,
            "step_prefill_s": statistics.median(prefill) if prefill else 0.0,
            "peak_gb": max(peaks) if peaks else None, "signal_frac": sum(signal) / len(signal) if signal else None,
            "timed_steps": len(steps)}


def print_table(result: dict, title: str):
    print(f"\n{title}\n")
    print("| phase | seconds | of which prefill | tokens | tokens/s | share of step |")
    print("|---|---|---|---|---|---|")
    for phase, row in result["phases"].items():
        share = "(once per run)" if phase == "first attempts" else f"{100 * row['s'] / result['step_s']:.0f}%"
        tok_s = f"{row['tok_s']:.0f}" if row["tok_s"] else "-"
        pre = f"{row['prefill_s']:.2f}" if phase not in ("update", "other") else ""
        print(f"| {phase} | {row['s']:.2f} | {pre} | {row['tokens']:.0f} | {tok_s} | {share} |")
    peak = f", peak GPU memory {result['peak_gb']:.2f} GiB" if result["peak_gb"] is not None else ""
    print(f"| **step (reflections .. other)** | **{result['step_s']:.2f}** | {result['step_prefill_s']:.2f} | | | 100% |")
    print(f"\nmedian of {result['timed_steps']} steps; groups with signal {result['signal_frac']}{peak}")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--rewards", default="random", choices=["random", "verifier"])
    p.add_argument("--model-config", default=None, help="build a model of this shape (bench/<name>.json or tiny)")
    p.add_argument("--random-weights", action="store_true", help="with --model-config: random weights (required)")
    p.add_argument("--4bit", dest="load_in_4bit", action="store_true", help="NF4 base weights + LoRA (QLoRA)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory for --model-config (default: embedded)")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    p.add_argument("--reuse", default="both", choices=["both", "on", "off"],
                   help="KV reuse in the rollouts: both = off, then on, each in its own process")
    p.add_argument("--decode", default="step", choices=["step", "hf"],
                   help="decode steps by decode.decode_step, or by transformers' forward (decode.FAST_DECODE off)")
    p.add_argument("--before", default=BEFORE, help="--reuse both: the git revision timed as 'before' (none: skip)")
    p.add_argument("--queries", default=None, help="(internal) a file sharing the failed queries between runs")
    p.add_argument("--result", default=None, help="(internal) write the result as JSON to this file")
    own, rest = p.parse_known_args(argv)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if own.model_config and not own.random_weights:
        p.error("--model-config builds a model with random weights: pass --random-weights too")
    return own, rest


def compare(own, train_argv) -> dict:
    """--reuse both: one run with KV reuse off, one with it on, each in its own process."""
    work = tempfile.mkdtemp(prefix="r3-reuse-bench-")
    results = {}
    runs = [("off", os.path.abspath(__file__), "off"), ("on", os.path.abspath(__file__), "on")]
    if own.before != "none":  # the old tree, unpacked from git, runs its own copy of this bench
        tree = os.path.join(work, "before")
        os.makedirs(tree)
        archive = subprocess.run(f"git -C {ROOT} archive {own.before} | tar -x -C {tree}", shell=True)
        if archive.returncode:
            raise SystemExit(f"--before {own.before}: git archive failed (a clone with its history is needed)")
        runs.insert(0, ("before", os.path.join(tree, "bench", "r3_step_bench.py"), "on"))
    try:
        for name, script, mode in runs:
            out = os.path.join(work, f"{name}.json")
            cmd = [sys.executable, script, "--reuse", mode, "--steps", str(own.steps),
                   "--warmup", str(own.warmup), "--rewards", own.rewards, "--queries", os.path.join(work, "queries.json"),
                   "--result", out] + (["--model-config", own.model_config, "--random-weights"] if own.model_config else []) \
                + (["--4bit"] if own.load_in_4bit else []) + (["--tokenizer", own.tokenizer] if own.tokenizer else []) \
                + ["--"] + train_argv
            print(f"$ {' '.join(cmd)}", flush=True)
            if subprocess.run(cmd).returncode:
                raise SystemExit(f"the {name} run failed")
            with open(out) as f:
                results[name] = json.load(f)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    off, on = results["off"], results["on"]
    print("\nKV reuse off vs on: the same seeds and failed queries, each run in its own process\n")
    def row(label, a, b):
        print(f"| {label} | {a:.2f} | {b:.2f} | {f'{a / b:.2f}×' if b > 0 else '-'} |")
    print("| | reuse off | reuse on | speed-up |")
    print("|---|---|---|---|")
    for phase in PHASES:
        row(f"{phase} s", off["phases"][phase]["s"], on["phases"][phase]["s"])
        if phase in ("first attempts", "reflections", "retries"):
            row("... of which prefill s", off["phases"][phase]["prefill_s"], on["phases"][phase]["prefill_s"])
    print(f"| **step s** | **{off['step_s']:.2f}** | **{on['step_s']:.2f}** | **{off['step_s'] / on['step_s']:.2f}×** |")
    # CPU seconds (all threads) of the process: less sensitive than wall time to other load on the machine
    print(f"| step CPU s | {off['step_cpu_s']:.2f} | {on['step_cpu_s']:.2f} | {off['step_cpu_s'] / on['step_cpu_s']:.2f}× |")
    for key, label in (("peak_rss_gb", "peak RSS GiB (whole run)"), ("step_peak_rss_gb", "peak RSS GiB (steps)"),
                       ("peak_gb", "peak GPU memory GiB")):
        if off.get(key) is not None:
            print(f"| {label} | {off[key]:.2f} | {on[key]:.2f} | |")
    print(f"\nR3 step speed-up from KV reuse: {off['step_s'] / on['step_s']:.2f}×", flush=True)
    # Amdahl: reuse removes prefill only, so even a step whose reflections and retries had no prefill at
    # all would still decode and update. This bounds what any prefill saving can give at these settings.
    floor = on["step_s"] - on["step_prefill_s"]
    print(f"Ceiling for any prefill saving (reuse-off step / reuse-on step without its {on['step_prefill_s']:.2f} s of "
          f"prefill): {off['step_s'] / floor:.2f}×", flush=True)
    result = {"off": off, "on": on, "speedup": off["step_s"] / on["step_s"], "ceiling": off["step_s"] / floor}
    if "before" in results:
        before = results["before"]
        print(f"\nBefore ({own.before}, KV reuse on) vs now (KV reuse on): the same seeds and failed queries\n")
        print("| | before | now | speed-up |")
        print("|---|---|---|---|")
        for phase in PHASES:
            row(f"{phase} s", before["phases"][phase]["s"], on["phases"][phase]["s"])
        print(f"| **step s** | **{before['step_s']:.2f}** | **{on['step_s']:.2f}** | "
              f"**{before['step_s'] / on['step_s']:.2f}×** |")
        row("step CPU s", before["step_cpu_s"], on["step_cpu_s"])
        for key, label in (("peak_rss_gb", "peak RSS GiB (whole run)"), ("step_peak_rss_gb", "peak RSS GiB (steps)"),
                           ("peak_gb", "peak GPU memory GiB")):
            if on.get(key) is not None:
                print(f"| {label} | {before[key]:.2f} | {on[key]:.2f} | |" if before.get(key) is not None else
                      f"| {label} | not measured | {on[key]:.2f} | |")
        print(f"\nR3 step speed-up vs before: {before['step_s'] / on['step_s']:.2f}×", flush=True)
        result.update(before=before, speedup_vs_before=before["step_s"] / on["step_s"])
    if own.json:
        print("RESULT " + json.dumps(result), flush=True)
    return result


def main(argv=None):
    own, train_argv = parse(argv)
    if own.reuse == "both":
        return compare(own, train_argv)
    import config
    import decode
    import loop
    import rl
    import rollout
    import sample
    import train_r3
    work = tempfile.mkdtemp(prefix="r3-step-bench-")
    if own.model_config:
        import torch

        import random_model
        device = "cuda" if torch.cuda.is_available() else "cpu"
        t = time.perf_counter()
        model_dir = random_model.build(own.model_config, os.path.join(work, "model"), own.tokenizer, device=device)
        print(f"random {own.model_config} model written to {model_dir} in {time.perf_counter() - t:.0f}s", flush=True)
        train_argv = ["--model", str(model_dir)] + train_argv
    if own.load_in_4bit:
        train_argv = ["--4bit"] + train_argv
    # The paper's R3 step, as --before ran it (not the embedded recipe's R3 choices, nor its micro-batch cap);
    # flags after `--` win.
    argv = ["--method", "r3", "--warmup-steps", "0", *config.PAPER_R3_STEP.split(), "--micro-batch-tokens", "0"] \
        + train_argv \
        + ["--steps", str(own.warmup + own.steps), "--eval-every", "0", "--save-every", str(10**9),
           "--out-dir", os.path.join(work, "run")]
    args = train_r3.parse_args(argv)

    sample.REUSE = own.reuse == "on"
    decode.FAST_DECODE = own.decode == "step"
    if own.queries:  # the same failed queries in both runs: the second samples (and times) its own, then takes the first's
        sample_failures = train_r3.failure_dataset

        def failure_dataset(*a, **kw):
            rows, tokens = sample_failures(*a, **kw)
            if os.path.exists(own.queries):
                with open(own.queries) as f:
                    return json.load(f), tokens
            with open(own.queries, "w") as f:
                json.dump(rows, f)
            return rows, tokens
        train_r3.failure_dataset = failure_dataset
    clock = Clock()
    rollout.sample_turns = clock.wrap_sampling(rollout.sample_turns)
    sample.prefill = clock.wrap_prefill(sample.prefill)
    rl.update = clock.wrap_update(rl.update)
    train_r3.train_step = clock.wrap_step(train_r3.train_step)
    if own.rewards == "random":
        rng = random.Random(0)
        loop.reward = lambda verdict, kind="binary": rng.random()
    t = time.perf_counter()
    try:
        train_r3.main(argv)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - t
    result = summarize(clock, own.warmup)
    result.update({"config": {k: str(v) for k, v in vars(args).items() if k in (
        "model", "task", "group_size", "batch_size", "micro_batch", "max_new_tokens", "reflect_tokens",
        "lora_r", "load_in_4bit", "train_size")}, "rewards": own.rewards, "wall_s": wall, "reuse": own.reuse,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # Linux: KiB
        "step_peak_rss_gb": peak_rss_gb()})
    c = result["config"]
    print_table(result, f"R3 step on {own.model_config or c['model']}{' (4-bit + LoRA)' if own.load_in_4bit else ''}: "
                        f"{c['batch_size']} failed queries x {c['group_size']} reflections, reflections "
                        f"<= {c['reflect_tokens']} tokens, attempts/retries <= {c['max_new_tokens']}, LoRA r="
                        f"{c['lora_r']}, micro-batch {c['micro_batch']}, rewards {own.rewards}, KV reuse {own.reuse}; "
                        f"run {wall:.0f}s, peak RSS {result['peak_rss_gb']:.2f} GiB")
    if own.json:
        print("RESULT " + json.dumps(result), flush=True)
    if own.result:
        with open(own.result, "w") as f:
            json.dump(result, f)
    return result


if __name__ == "__main__":
    main()
