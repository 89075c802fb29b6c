"""train_r3.py's configuration: its flags, the presets that fill the ones a user leaves out (--quick, the
embedded model's countdown recipe), the checks that turn a flag no run could use into one error line, and
the header line that says what made a run. The trainer (train_r3.py) reads the namespace parse_args returns;
SCoRe and Re-ReST (score.py, rerest.py) read their own flags from it.
"""
import argparse
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import cli
import tasks
from loop import PARTIAL_CREDIT, TASK_TOKENS
from model import DEFAULT_MODEL, LORA_TARGETS, resolve_adapter

# --quick: the whole loop (failure set, reflections, retries, update, checkpoint, two-try eval) at toy size.
# failure_credit 0: after one warm-up step, 8 queries hold no near miss (the recipe's 0.5 would leave none).
QUICK = {"steps": 2, "warmup_steps": 1, "refresh_failures": 0, "failure_credit": 0.0, "train_size": 8, "eval_size": 4,
         "batch_size": 2, "group_size": 2, "max_new_tokens": 24, "reflect_tokens": 24, "k": 2, "sft_epochs": 1,
         "eval_every": 2}
# The README's main command on the embedded 135M model (`python train_r3.py --task countdown`): a recipe in
# which R3 gets signal on a CPU (docs/deviations.md). The base model solves no Countdown problem, so no
# retry passes and no group has signal: the easy source, a short GRPO warm-up with partial credit (a third
# of --steps, 8 of 24), and a failure set rebuilt as the policy improves. Hub models keep the paper's setting.
EMBEDDED_COUNTDOWN = {"source": "easy", "steps": 24, "refresh_failures": 6, "reward": "partial", "lr": 2e-4,
                      "max_new_tokens": 24, "reflect_tokens": 32, "temperature": 0.7, "eval_every": 12,
                      "micro_batch": 16,  # micro_batch: an R3 step (4 x 4) in one pass; the same gradient
                      "micro_batch_tokens": 3072,  # but each trained retry has its own long prompt: 16 took 11.7 GB
                      # R3 only, the arm whose second try fixes first tries (2026-12-07, docs/self_correction.md):
                      # reflect on near misses only, train the retry beside the reflection and the first try, a
                      # retry below its attempt earns 0, and a copy of the failed answer loses 0.5 of advantage
                      "failure_credit": 0.5, "train_attempts": True, "train_retries": True,
                      "retry_reward": "no-worse", "repeat_reward": 0.0, "repeat_advantage": -0.5}
R3_ONLY = {"warmup_steps", "refresh_failures", "solvable_k", "failure_credit", "repeat_reward", "retry_reward",
           "repeat_advantage", "train_attempts", "train_retries"}
# Per-method defaults of the flags left at None. Re-ReST's are its official code's (LoRA r 8, alpha 16 on
# q/v, lr 3e-4); the rest are ours (the R3 paper publishes no learning rate or LoRA shape).
METHOD_DEFAULTS = {"rerest": {"lora_r": 8, "lora_alpha": 16, "lora_targets": "qv", "lr": 3e-4},
                   "other": {"lora_r": 16, "lora_alpha": None, "lora_targets": "all", "lr": 1e-4}}


def optional_float(text: str) -> float | None:
    """A number, or "none" (unset: a recipe's value can be turned off from the command line)."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or 'none', not {text!r}")


def parse_args(argv=None, description: str | None = None):
    """The run's flags (description: the --help text above them, train_r3.py's docstring), presets applied."""
    p = cli.ArgumentParser(description=description, epilog=LIMITS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="countdown", choices=tasks.TASK_NAMES)
    p.add_argument("--source", default=None, help="task data: a built-in source name, a local file or a Hub id "
                   f"(defaults: {tasks.DEFAULT_SOURCE})")
    p.add_argument("--method", default="r3", choices=["r3", "grpo", "score", "rerest"])
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded model, Hub id, local dir or .gguf file")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default 16; Re-ReST: 8)")
    p.add_argument("--lora-alpha", type=int, default=None, help="LoRA alpha (default 2r; Re-ReST: 16)")
    p.add_argument("--lora-targets", default=None, choices=sorted(LORA_TARGETS),
                   help="layers with LoRA: all linear layers, or q/v projections (default all; Re-ReST: qv)")
    p.add_argument("--4bit", dest="load_in_4bit", action="store_true", help="NF4 4-bit base weights (QLoRA)")
    p.add_argument("--group-size", type=int, default=4, help="G: reflections (r3) or attempts (grpo) per query")
    p.add_argument("--batch-size", type=int, default=4, help="queries per step (all ranks together)")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward")
    p.add_argument("--micro-batch-tokens", type=int, default=0, metavar="N", help="also at most N padded tokens "
                   "(rows x longest prompt+completion) per forward/backward: bounds activation memory when lengths "
                   "vary (0: no cap; docs/gpu.md)")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation (gradient) checkpointing: each "
                   "decoder layer's activations are recomputed in backward instead of kept (less memory, about one "
                   "more forward pass per update; docs/gpu.md)")
    p.add_argument("--updates-per-batch", type=int, default=1, help=">1 reuses a batch with PPO ratio clipping")
    p.add_argument("--clip-eps", type=float, default=0.2)
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (LoRA; default 1e-4, not published "
                   "by R3; Re-ReST: 3e-4)")
    p.add_argument("--kl-beta", type=float, default=None, help="KL to the base model, R3/GRPO (default 0.001 as "
                   "R3, k3 estimator); SCoRe uses --beta1/--beta2")
    p.add_argument("--skip-flat-groups", action="store_true", help="leave groups whose rewards are all equal out "
                   "of the update (faster; drops their KL pull and their share of the normaliser, unlike TRL); a group "
                   "that --repeat-advantage shifts is kept")
    p.add_argument("--loss-agg", default="grpo", choices=["grpo", "token"],
                   help="grpo: per-sequence token mean; token: mean over all tokens (DAPO)")
    p.add_argument("--max-new-tokens", type=int, default=None, help=f"attempt/retry length (default per task: {TASK_TOKENS})")
    p.add_argument("--reflect-tokens", type=int, default=64, help="reflection length")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--reward", default="binary", choices=["binary", "partial"],
                   help=f"binary: 1 if the verifier passes (the paper); partial: also {PARTIAL_CREDIT}")
    p.add_argument("--repeat-reward", type=optional_float, default=None, metavar="R", help="r3: a failed retry whose "
                   "answer repeats the failed attempt's (the same, or an equivalent form) earns R instead of the "
                   "verifier's credit (default none: the verifier's reward, as the paper; embedded model on countdown: "
                   "0; docs/self_correction.md)")
    p.add_argument("--retry-reward", default="verifier", choices=["verifier", "progress", "no-worse"],
                   help="r3: what a retry earns. verifier: its verdict's reward (the paper); progress: only its gain "
                   "over the failed attempt, max(0, r(retry) - r(attempt)), so a repeat or a change that fails as badly "
                   "earns 0; no-worse: its reward, or 0 if below the failed attempt's, so a retry that breaks a rule "
                   "the attempt kept earns 0 (both ours; docs/self_correction.md)")
    p.add_argument("--repeat-advantage", type=float, default=0.0, metavar="A", help="r3: A (<= 0) added to the "
                   "advantage of each reflection (and, with --train-retries, its retry) whose failed retry repeats the "
                   "failed answer, after the group normalisation, so a group whose retries all copy (equal rewards, "
                   "advantage 0) is still pushed away from what led to the copies; e.g. -0.5 (0: off, as the paper; "
                   "ours; docs/self_correction.md)")
    p.add_argument("--train-attempts", action=argparse.BooleanOptionalAction, default=False, help="r3: each R3 step "
                   "also samples G first attempts of its queries and adds plain GRPO on them to the same update, so the "
                   "first try is trained, not only the reflection that shares its LoRA (ours, default off; embedded model "
                   "on countdown: on; docs/self_correction.md)")
    p.add_argument("--train-retries", action=argparse.BooleanOptionalAction, default=False, help="r3: each R3 step "
                   "also trains the retry tokens, with the advantage of the reflection before them, so the second try "
                   "itself learns what a failed first try should change (ours, default off: the paper trains the "
                   "reflection only; docs/self_correction.md)")
    p.add_argument("--reflect-prompt", default="approach", choices=sorted(tasks.REFLECT_PROMPTS), help="r3: what the "
                   "reflection is asked for. approach: what went wrong and what to try, no answer yet (as the paper's "
                   "request); candidate: what went wrong, then a corrected answer to try (ours; docs/self_correction.md)")
    p.add_argument("--retry-context", default="conversation", choices=tasks.RETRY_CONTEXTS, help="r3: what the "
                   "retry sees. conversation: the question, the failed attempt and the reflection (as the paper); "
                   "reflection: the question led by the reflection as a note, no failed answer to copy (ours; "
                   "docs/self_correction.md). eval.py asks for second tries so too")
    p.add_argument("--init-adapter", default=None, metavar="DIR", help="start from a saved LoRA adapter (a run "
                   "directory or an adapter directory; its LoRA shape is used); the KL reference stays the base model")
    p.add_argument("--warmup-steps", type=int, default=None, help="r3: plain GRPO steps on first attempts (reward "
                   "--warmup-reward) before the R3 steps; they count in --steps (not in the paper; default 0, "
                   "embedded model on countdown: a third of --steps)")
    p.add_argument("--warmup-reward", default="partial", choices=["binary", "partial"], help="the warm-up's reward")
    p.add_argument("--refresh-failures", type=int, default=None, metavar="N", help="r3: rebuild the failure set "
                   "from the current policy every N R3 steps (0: once, as the paper; default 0, embedded model on "
                   f"countdown: {EMBEDDED_COUNTDOWN['refresh_failures']})")
    p.add_argument("--solvable-k", type=int, default=0, metavar="K", help="r3: sample K first attempts per query for "
                   "the failure set and keep only the queries the policy sometimes solves (some of the K fail and some "
                   "pass: pass@K > 0), each with its first failed attempt, so a retry can succeed; the K samples count "
                   "toward --token-budget (0: one attempt, kept if it fails, as the paper; ours; docs/self_correction.md)")
    p.add_argument("--failure-credit", type=float, default=0.0, metavar="C", help="r3: keep only the failed attempts "
                   "whose partial credit (loop.PARTIAL_CREDIT) is at least C: on countdown 0.5 keeps the near misses "
                   "(the given numbers, the wrong value), so a retry needs only other operators (0: every failed "
                   "attempt, as the paper; ours; docs/self_correction.md)")
    p.add_argument("--token-budget", type=int, default=0, help="end the run after the step whose sampled tokens "
                   "bring its total to N (0: none); for comparisons at equal compute")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 10; embedded model on "
                   f"countdown: {EMBEDDED_COUNTDOWN['steps']})")
    p.add_argument("--train-size", type=int, default=64, help="training queries (first attempts sampled on these)")
    p.add_argument("--eval-size", type=int, default=32, help="held-out examples for the periodic eval (0: no eval)")
    p.add_argument("--eval-every", type=int, default=10, help="steps between evals (0: never)")
    p.add_argument("--save-every", type=int, default=5, help="steps between checkpoints")
    p.add_argument("--out-dir", default=None, help="run directory (default runs/<task>-<method>)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a check that the whole loop runs, in minutes on a laptop "
                   f"CPU: sets {QUICK} (flags you give win) and a new temporary --out-dir (with --resume, give the "
                   "--out-dir to continue)")
    p.add_argument("--wandb", nargs="?", const="r3", default=None, metavar="PROJECT",
                   help="also log the metrics to Weights & Biases (project 'r3' unless named; offline without an API key)")
    p.add_argument("--tensorboard", action="store_true", help="also log the metrics to <out-dir>/tensorboard")
    # SCoRe and Re-ReST (score.py, rerest.py) read their own flags from the same namespace.
    p.add_argument("--alpha", type=float, default=10.0, help="SCoRe reward-shaping bonus alpha (paper: 10)")
    p.add_argument("--beta1", type=float, default=0.01, help="SCoRe KL coefficient beta1 (paper: 0.01)")
    p.add_argument("--beta2", type=float, default=0.1, help="SCoRe stage-I KL on attempt 1, beta2 (paper: 0.1 MATH)")
    p.add_argument("--stage1-steps", type=int, default=None, help="SCoRe stage I steps (default: half of --steps; "
                   "stored in the checkpoint, so --resume keeps the run's boundary)")
    p.add_argument("--stage1-beta-t2", type=float, default=0.0, help="SCoRe stage I KL on attempt 2 (paper eq. 3: "
                   "none, 0; our earlier runs used beta1)")
    p.add_argument("--k", type=int, default=4, help="Re-ReST: samples per input")
    p.add_argument("--sft-epochs", type=int, default=3, help="Re-ReST: epochs of supervised fine-tuning (paper: 3)")
    args = p.parse_args(argv)
    cli.check_not_empty(p, args)  # --out-dir "" would silently train into runs/<task>-<method>
    words = sys.argv[1:] if argv is None else list(argv)
    given = {act.dest for act in p._actions for opt in act.option_strings
             for w in words if w == opt or w.startswith(opt + "=")}
    # The presets fill only the flags the user did not give; --quick's sizes win over the recipe's.
    presets = ([QUICK] if args.quick else []) + ([EMBEDDED_COUNTDOWN] if args.model == DEFAULT_MODEL and
                                                 args.task == "countdown" and args.method in ("r3", "grpo") else [])
    args.preset_flags = {}  # flag -> the preset that set it, so a message about it can say so
    for preset in presets:
        for name, value in preset.items():
            if name not in given and (args.method == "r3" or name not in R3_ONLY):
                setattr(args, name, value)
                given.add(name)
                args.preset_flags[name] = "--quick" if preset is QUICK else "the embedded model's countdown recipe"
    args.steps = 10 if args.steps is None else args.steps
    if args.warmup_steps is None and args.method == "r3" and EMBEDDED_COUNTDOWN in presets:
        args.warmup_steps = args.steps // 3
        args.preset_flags["warmup_steps"] = "the embedded model's countdown recipe"
    args.warmup_steps = args.warmup_steps or 0
    args.refresh_failures = args.refresh_failures or 0
    if args.method == "score" and args.kl_beta is not None:
        p.error("--kl-beta is R3/GRPO's; SCoRe's KL coefficients are --beta1 and --beta2")
    validate(args)
    for name, value in METHOD_DEFAULTS["rerest" if args.method == "rerest" else "other"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.kl_beta = 0.001 if args.kl_beta is None else args.kl_beta
    args.max_new_tokens = args.max_new_tokens or TASK_TOKENS[args.task]
    if args.eval_size == 0:  # no held-out examples: no eval (not an "accuracy" of 0 on none)
        args.eval_every = 0
    if args.quick and args.out_dir is None and os.environ.get("WORLD_SIZE", "1") == "1":
        # A throwaway check: a new directory each time, never an old run's (ranks would each make their
        # own). Named here, made with the lock: a refusal before that leaves nothing in the temp dir.
        args.out_dir = os.path.join(tempfile.gettempdir(), f"r3-quick-{args.task}-{args.method}-"
                                    f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    args.out_dir = Path(args.out_dir or f"runs/{args.task}-{args.method}")
    args.stage1_steps = args.steps // 2 if args.stage1_steps is None else args.stage1_steps
    return args


def as_flags(values: dict) -> str:
    """{"train_retries": True, "lr": 2e-4} -> "--train-retries --lr 0.0002": a preset as a user would type it."""
    return " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in values.items())


RECIPE = as_flags({k: v for k, v in EMBEDDED_COUNTDOWN.items() if k not in R3_ONLY})
R3_RECIPE = as_flags({k: v for k, v in EMBEDDED_COUNTDOWN.items() if k in R3_ONLY})
# What turns the recipe's R3 choices off (the paper's R3 step); --help and docs/deviations.md name it
PAPER_R3_STEP = ("--failure-credit 0 --retry-reward verifier --repeat-reward none --repeat-advantage 0 "
                 "--no-train-attempts --no-train-retries")
LIMITS = textwrap.fill(f"the embedded model on countdown (--method r3 or grpo) has its own defaults for the flags "
                       f"you do not give, a recipe in which R3 gets signal on a CPU (docs/deviations.md): {RECIPE}; "
                       f"for r3 also --warmup-steps a third of --steps and {R3_RECIPE} (the paper's R3 step: "
                       f"{PAPER_R3_STEP}). Any other --model keeps the defaults above.", 100,
                       break_on_hyphens=False) + f"""

limits (checked before anything loads; a broken one is one error line, exit code 2):
  --steps, --batch-size, --micro-batch, --updates-per-batch, --save-every, --train-size, --k,
  --max-new-tokens, --reflect-tokens, --lora-r, --lora-alpha: at least 1
  --group-size: at least 2 for r3 and grpo, at least 1 otherwise
  --lr, --clip-eps: > 0; --temperature: > 0 (Re-ReST: >= 0); --kl-beta, --alpha, --beta1, --beta2,
  --stage1-beta-t2, --eval-size, --eval-every, --sft-epochs, --stage1-steps, --warmup-steps,
  --refresh-failures, --token-budget, --micro-batch-tokens: >= 0; --repeat-reward (r3 only): at most 1;
  --repeat-advantage (r3 only): at most 0;
  --solvable-k (r3 only): 0 or at least 2; --failure-credit (r3 only): >= 0 and below 1 (a pass earns 1);
  r3: --warmup-steps below --steps;
  every number finite
  --eval-size 0: no eval (--eval-every is then ignored); --out-dir, --source, --model and the other
  names and paths: not empty
  --out-dir: a directory that can be written; one run at a time (a lock); a fresh run refuses a directory
  that already holds a run's metrics or checkpoints (--resume it, or pick another --out-dir)
  data rows: at most {tasks.MAX_ROW_CHARS:,} characters each, and a prompt that fits the model's context
  with --max-new-tokens and --reflect-tokens; other rows are skipped with a count (none left: an error)"""


def validate(args):
    """Every flag that argparse accepts but no run could use: one line at parse time, not a crash later.
    Each flag's own limits first, then the rules between flags, so a message names the flag to fix."""
    a, rl_method = args, args.method in ("r3", "grpo")
    if a.quick and a.resume and a.out_dir is None:
        raise cli.UsageError("--quick --resume needs --out-dir, the quick run to continue (--quick alone "
                             "starts a new temporary one)")
    at_least_1 = ["steps", "batch_size", "group_size", "micro_batch", "updates_per_batch", "save_every",
                  "train_size", "reflect_tokens", "k"]
    non_negative = ["eval_size", "eval_every", "sft_epochs", "alpha", "beta1", "beta2", "stage1_beta_t2",
                    "temperature", "warmup_steps", "refresh_failures", "solvable_k", "failure_credit", "token_budget",
                    "micro_batch_tokens"]
    optional = [("max_new_tokens", 1), ("lora_r", 1), ("lora_alpha", 1)]  # None: the per-method default
    rules = [(name, getattr(a, name), getattr(a, name) >= 1, "at least 1") for name in at_least_1]
    rules += [(name, getattr(a, name), getattr(a, name) >= 0, ">= 0") for name in non_negative]
    rules += [(name, getattr(a, name), getattr(a, name) is None or getattr(a, name) >= low, f"at least {low}")
              for name, low in optional]
    rules += [(name, getattr(a, name), getattr(a, name) is None or getattr(a, name) > 0, "> 0")
              for name in ("lr", "clip_eps")]
    rules += [(name, getattr(a, name), getattr(a, name) is None or getattr(a, name) >= 0, ">= 0")
              for name in ("kl_beta", "stage1_steps")]
    rules += [("repeat_advantage", a.repeat_advantage, a.repeat_advantage <= 0, "at most 0 (a copy must not gain)")]
    rules += [("failure_credit", a.failure_credit, a.failure_credit < 1, "below 1 (a pass earns 1: no failed "
               "attempt would be kept)")]
    rules += [("repeat_reward", a.repeat_reward, a.repeat_reward is None or a.repeat_reward <= 1, "at most 1 "
               "(a pass earns 1)")]
    cli.check_flags([("--" + name.replace("_", "-"), value, ok, want) for name, value, ok, want in rules])
    if a.group_size < 2 and rl_method:
        raise cli.UsageError(f"--group-size must be at least 2 for {a.method}: a group of one has no advantage "
                             f"(its reward minus its own mean), so nothing would be learned; got {a.group_size}")
    if a.method != "r3" and (a.warmup_steps or a.refresh_failures or a.solvable_k or a.failure_credit):
        raise cli.UsageError("--warmup-steps, --refresh-failures, --solvable-k and --failure-credit are R3's (its "
                             f"phases and its failure set); --method {a.method} has none of them")
    if a.solvable_k == 1:
        raise cli.UsageError("--solvable-k must be 0 (off) or at least 2: one sample cannot both fail and pass")
    if a.method != "r3" and a.repeat_reward is not None:
        raise cli.UsageError(f"--repeat-reward is R3's (a retry that repeats the failed attempt); --method "
                             f"{a.method} has no retry")
    if a.method != "r3" and (a.retry_reward != "verifier" or a.train_attempts or a.train_retries or a.repeat_advantage
                           or a.reflect_prompt != "approach" or a.retry_context != "conversation"):
        raise cli.UsageError(f"--retry-reward, --retry-context, --train-attempts, --train-retries, --repeat-advantage "
                             f"and --reflect-prompt are R3's (its retry, its step and its reflection); --method {a.method} "
                             "has none of them")
    if a.method == "r3" and a.warmup_steps >= a.steps:
        raise cli.UsageError(f"{said(a, 'warmup_steps')} leaves no R3 step of {said(a, 'steps')}; give fewer "
                             "--warmup-steps or more --steps")
    if a.temperature <= 0 and a.method != "rerest":
        raise cli.UsageError(f"--temperature must be > 0 for training: at {a.temperature} every sample of a "
                             "group is the same, so no group carries signal")
    if a.init_adapter:
        resolve_adapter(a.init_adapter)  # a missing adapter fails now, not after the data and model load
    if a.out_dir is not None and Path(a.out_dir).exists() and not Path(a.out_dir).is_dir():
        raise cli.UsageError(f"--out-dir {a.out_dir}: exists and is not a directory")


def said(args, name: str) -> str:
    """A flag as the run has it, and who set it when the user did not: `--steps 2 (set by --quick)`."""
    by = getattr(args, "preset_flags", {}).get(name)
    return f"--{name.replace('_', '-')} {getattr(args, name)}" + (f" (set by {by})" if by else "")


def header(args) -> str:
    """The run's settings in one line, so a log says what made it."""
    keys = ["method", "task", "source", "model", "init_adapter", "steps", "token_budget", "batch_size", "group_size",
            "lr", "lora_r", "lora_alpha", "lora_targets", "temperature", "reward", "max_new_tokens", "seed"]
    keys += {"r3": ["kl_beta", "reflect_tokens", "reflect_prompt", "retry_context", "retry_reward", "repeat_reward",
                    "repeat_advantage", "train_attempts", "train_retries", "skip_flat_groups", "warmup_steps",
                    "warmup_reward", "refresh_failures", "solvable_k", "failure_credit"],
             "grpo": ["kl_beta", "skip_flat_groups"],
             "score": ["alpha", "beta1", "beta2", "stage1_steps", "stage1_beta_t2"],
             "rerest": ["k", "sft_epochs"]}[args.method]
    return "run: " + " ".join(f"{k}={getattr(args, k)}" for k in keys)
