"""The run machinery every method shares: process group and model set-up, the step loop with seeded
batches, rewards, the held-out eval, metrics lines and checkpoints.

train_r3.py (R3, GRPO), score.py (SCoRe) and rerest.py (Re-ReST) import this file; it imports none of
them. Data parallel (torchrun) is built to train *one* model: every rank starts from the same adapter,
every row's randomness follows from its query and the step (not from the rank), the loss is normalised
over the global batch and gradients are summed, so N ranks end where one process with the same global
batch ends (tests/test_train.py checks it, and that the ranks' adapters agree after every step).
"""
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import cli
import rl
import rollout
import rundir
import tasks
from model import activation_checkpointing, load_model, resolve_adapter
from rollout import Gen
from sample import mix_seed

TASK_TOKENS = {"countdown": 48, "function_calling": 128, "math": 256, "code": 256}  # answer lengths
# --reward partial: some credit for failing closer to a pass, a denser signal for small models that
# almost never pass (our choice, not the paper's; the papers and eval.py use the binary verdict).
PARTIAL_CREDIT = {"invalid_equation": 0.1, "wrong_numbers": 0.25, "missed_target": 0.5, "wrong_tool": 0.1,
                  "wrong_arguments": 0.5, "runtime_error": 0.1, "wrong_answer": 0.25}


CONTEXT_MARGIN = 16  # a reply re-tokenized inside the chat template can take a few more tokens than it was


def reward(verdict, kind: str = "binary") -> float:
    if verdict.correct:
        return 1.0
    return PARTIAL_CREDIT.get(verdict.error, 0.0) if kind == "partial" else 0.0


def copied(verdict, repeated: bool) -> bool:
    """A failed retry that gave the failed attempt's answer again (repeated: verifiers.same_answer): what
    --repeat-reward pays for and --repeat-advantage costs. A retry that passes is never a copy of a failure."""
    return repeated and not verdict.correct


def retry_reward(verdict, repeated: bool, kind: str = "binary", repeat_reward: float | None = None,
                 attempt=None, rule: str = "verifier") -> float:
    """R3's reward for a retry. By default the verifier's (the paper, with kind binary).
    repeat_reward: a failed retry that repeats the failed attempt's answer (verifiers.same_answer) earns
    repeat_reward instead of its partial credit: under partial credit a copy earned as much as the attempt
    did, so copying was the safest thing a reflection could lead to (in the spirit of UFO's repeat
    penalty, arXiv 2507.14295). rule (--retry-reward) compares the retry with attempt, the failed
    attempt's verdict. progress: the retry earns only what it gains over it, max(0, r(retry) - r(attempt)),
    so a repeat, a change for the worse and a change that fails the same way earn 0. Clamped, this is not
    SCoRe's r2 - r1 shift, which group normalisation would cancel: every retry of a group follows the same
    attempt. no-worse: the retry's own reward, or 0 if it is below the attempt's, so a change that trades a
    near miss for a broken rule earns nothing while a new near miss keeps its credit. repeat_reward and
    both rules are ours."""
    if copied(verdict, repeated) and repeat_reward is not None:
        return repeat_reward
    earned = reward(verdict, kind)
    if rule == "progress":
        return max(0.0, earned - reward(attempt, kind))
    if rule == "no-worse":
        return earned if earned >= reward(attempt, kind) else 0.0
    return earned


# ---------------------------------------------------------------------------------------------- seeds and batches

def batch_at(step: int, n_items: int, batch_size: int, seed: int) -> list[int]:
    """Indices of step's global batch: epochs of a seeded shuffle, so the data position follows from the step."""
    idx = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n_items)
        idx.append(torch.randperm(n_items, generator=torch.Generator().manual_seed(seed + epoch))[pos].item())
    return idx


def my_share(items: list, rank: int, size: int) -> list:
    """This rank's items of a global list: every size-th, starting at rank."""
    return items[rank::size]


# ---------------------------------------------------------------------------------------------- set-up

def rank_device(local_rank: int) -> str:
    """This process's device: a GPU, LOCAL_RANK modulo the GPUs it sees (a launcher that gives each process
    one GPU shows it as cuda:0 to every rank), or the CPU when it sees none."""
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{local_rank % torch.cuda.device_count()}"


def setup(args):
    """Process group (under torchrun), seeds, run directory, model, optimizer, resumed state."""
    device = rank_device(int(os.environ.get("LOCAL_RANK", 0)))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device != "cpu":  # before NCCL: its buffers go to the current device, else cuda:0 for all
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device != "cpu" else "gloo")
    rank, size = rl.world()
    # The same seed on every rank: peft draws LoRA-A from it, and the ranks must start as one model.
    torch.manual_seed(args.seed)
    if args.lora_r <= 0:
        raise cli.UsageError("training needs --lora-r > 0 (the base model with the adapter off is the KL reference)")
    say = print if rank == 0 else (lambda *a: None)
    check_run_dir(args, rank)
    # --init-adapter: start from a saved adapter (its LoRA shape); the KL reference stays the base model.
    init = getattr(args, "init_adapter", None)
    model, tok = load_model(args.model, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                            lora_targets=args.lora_targets, load_in_4bit=args.load_in_4bit, device=device,
                            adapter=str(resolve_adapter(init)) if init else None)
    if getattr(args, "grad_checkpointing", False):
        activation_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    rl.broadcast_params(params)  # belt and braces: rank 0's adapter is everyone's
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    state = {"step": 0}
    if args.resume:
        state = rundir.resume(args, model, optimizer, say)
        if args.method != "rerest" and state["step"] > args.steps:
            raise cli.UsageError(f"--resume: the checkpoint is at step {state['step']}, beyond --steps "
                                 f"{args.steps}; give --steps {state['step'] + 1} or more to train further")
        if rank == 0:
            rundir.trim_metrics(args.out_dir, state, say)
            rundir.clear_temporaries(args.out_dir)
    if rank == 0:
        (args.out_dir / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1))
        open_trackers(args)
    return model, tok, optimizer, state, rank, size


def check_run_dir(args, rank: int):
    """Before the model loads: the run directory is writable and ours alone (rank 0 takes the lock), and
    it holds no other run (fresh) or the same run (--resume)."""
    run = args.out_dir
    if args.resume and not (run.is_dir() and rundir.has_started(run)):
        raise cli.UsageError(f"--resume: no checkpoint in {run} (no run was started there)")
    if rank != 0:
        return
    rundir.lock(run)
    if args.resume:
        rundir.check_same_run(args)
    else:
        rundir.check_fresh(run)


def fit_context(model, tok, args, examples: list[dict], what: str, mode: str | None = None) -> list[dict]:
    """The examples whose longest conversation fits the model's context: the first-attempt prompt, the
    method's follow-up instructions and every token it may generate. The rest are skipped with a count,
    never fed to the model; none left is an error."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    mode = mode or {"grpo": "none", "score": "score"}.get(args.method, "r3")
    follow = lambda ex: {"none": [], "score": [tasks.correction_instruction(args.task)],  # noqa: E731
                         "r3": [tasks.reflect_instruction(args.task, args.reflect_prompt),
                                tasks.retry_instruction(args.task, ex)]}[mode]
    generated = args.max_new_tokens * (1 + (mode != "none")) + (args.reflect_tokens if mode == "r3" else 0)
    if not context or not examples:
        return examples
    if generated >= context:
        raise cli.UsageError(f"--max-new-tokens/--reflect-tokens: {generated} tokens to generate do not fit "
                             f"the model's context of {context}")
    keep = []
    for ex in examples:
        messages = tasks.first_attempt_messages(args.task, ex)
        for instruction in follow(ex):
            messages += [{"role": "assistant", "content": ""}, {"role": "user", "content": instruction}]
        if len(rollout.chat_ids(tok, messages)) + generated + CONTEXT_MARGIN <= context:
            keep.append(ex)
    if len(keep) < len(examples) and rl.world()[0] == 0:
        print(f"{what}: skipped {len(examples) - len(keep)} of {len(examples)} examples whose prompt and "
              f"{generated} generated tokens exceed the model's context of {context}")
    if not keep:
        raise cli.UsageError(f"{what}: no example fits the model's context of {context} tokens with "
                             f"{generated} generated (lower --max-new-tokens/--reflect-tokens, or shorter rows)")
    return keep


# ---------------------------------------------------------------------------------------------- logging and eval

def log_line(args, record: dict):
    """One metrics record: a line of metrics.jsonl, and the same numbers to --wandb / --tensorboard."""
    with open(args.out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
    for track in _trackers:
        track(record.get("step", 0), numbers)


_trackers, _closers = [], []  # set by open_trackers (rank 0 only), fed by log_line


def import_tracker(flag: str, package: str, module: str | None = None):
    """A tracker's module, or one line naming the flag and what to do: the package missing, a file of the
    same name shadowing it, or an install that fails on import (a protobuf mismatch, say)."""
    import importlib
    import importlib.util
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise cli.UsageError(f"{flag} needs the {package} package: pip install {package}")
    if not (spec.origin or "").endswith("__init__.py"):  # a wandb.py (or a wandb/ folder) of the user's
        where = spec.origin or ", ".join(spec.submodule_search_locations or [])
        raise cli.UsageError(f"{flag}: {where} shadows the {package} package; rename it, or run from "
                             "another directory")
    try:
        return importlib.import_module(module or package)
    except ImportError as e:
        raise cli.UsageError(f"{flag} needs the {package} package, which fails to import ({cli.first_line(e)}): "
                             f"pip install {package}")
    except Exception as e:  # noqa: BLE001 -- a broken install raises anything (TypeError from protobuf, ...)
        raise cli.UsageError(f"{flag}: the {package} package fails to import ({type(e).__name__}: "
                             f"{cli.first_line(e)}); reinstall it: pip install --force-reinstall {package}")


def wandb_has_key() -> bool:
    netrc = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        in_netrc = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")
    except OSError:
        in_netrc = False
    return bool(os.environ.get("WANDB_API_KEY")) or in_netrc


def check_trackers(args):
    """--wandb / --tensorboard, before the model loads: the packages import, and wandb has a way to log
    (an API key, or offline mode, which it gets when no key is set up)."""
    if getattr(args, "wandb", None) is not None:
        import_tracker("--wandb", "wandb")
        mode = os.environ.get("WANDB_MODE", "").strip().lower()
        if mode in ("online", "run") and not wandb_has_key():
            raise cli.UsageError(f"--wandb: WANDB_MODE={mode} but no wandb API key is set up; run `wandb login` "
                                 "(or set WANDB_API_KEY), or unset WANDB_MODE to log offline")
    if getattr(args, "tensorboard", False):
        import_tracker("--tensorboard", "tensorboard", "torch.utils.tensorboard")


def open_trackers(args):
    """--wandb / --tensorboard: experiment tracking with the same metrics as metrics.jsonl (off by default).
    wandb runs offline when no API key is set up (sync later with `wandb sync`); anything that stops a
    tracker from starting is one line naming it."""
    check_trackers(args)
    if getattr(args, "wandb", None) is not None:
        wandb = import_tracker("--wandb", "wandb")
        if not os.environ.get("WANDB_MODE") and not wandb_has_key():
            os.environ["WANDB_MODE"] = "offline"
            print(f"wandb: no API key, logging offline to {args.out_dir}/wandb (upload later: wandb sync <that dir>)")
        try:
            run = wandb.init(project=args.wandb, name=args.out_dir.name, dir=str(args.out_dir), resume="allow",
                             id=f"{args.out_dir.name}-{args.seed}",
                             config={k: str(v) for k, v in vars(args).items()})
        except Exception as e:  # noqa: BLE001 -- wandb's own errors (a bad WANDB_MODE, a refused key, ...)
            raise cli.UsageError(f"--wandb: wandb could not start ({type(e).__name__}: {cli.first_line(e)}); fix "
                                 "that, or drop --wandb (metrics.jsonl has the same numbers)")
        _trackers.append(lambda step, numbers: run.log(numbers, step=step))
        _closers.append(run.finish)
    if getattr(args, "tensorboard", False):
        SummaryWriter = import_tracker("--tensorboard", "tensorboard", "torch.utils.tensorboard").SummaryWriter
        try:
            writer = SummaryWriter(str(args.out_dir / "tensorboard"))
        except Exception as e:  # noqa: BLE001 -- e.g. <out-dir>/tensorboard is a file
            raise cli.UsageError(f"--tensorboard: cannot write {args.out_dir / 'tensorboard'} ({cli.first_line(e)})")

        def write(step, numbers):
            for name, value in numbers.items():
                writer.add_scalar(name, value, step)
            writer.flush()
        _trackers.append(write)
        _closers.append(writer.close)


def close_trackers():
    while _closers:
        _closers.pop()()
    _trackers.clear()


def evaluate(model, tok, args, test: list[dict], rank: int, size: int) -> dict:
    """First- and second-try accuracy on the held-out split (greedy), shared out over ranks."""
    model.eval()
    gen = Gen(args.max_new_tokens, temperature=0)
    mode = "score" if args.method == "score" else "r3"
    with rollout.progress(f"eval: two tries on {len(test)} held-out examples", leave=False):
        first, second = rollout.two_tries(model, tok, args.task, my_share(test, rank, size), gen, mode,
                                          Gen(args.reflect_tokens, temperature=0), args.reflect_prompt,
                                          args.retry_context)
    model.train()
    t1 = rl.gather([t.verdict.correct for t in first])
    t2 = rl.gather([t.verdict.correct for t in second])
    n = max(len(t1), 1)
    return {"acc_t1": sum(t1) / n, "acc_t2": sum(t2) / n,  # Δ i→c: wrong at the first try, right at the second
            "delta_i2c": sum(not a and b for a, b in zip(t1, t2)) / n,
            "delta_c2i": sum(a and not b for a, b in zip(t1, t2)) / n}


def eval_line(step: int, record: dict) -> str:
    return (f"step {step}: eval first try {record['acc_t1']:.3f}, second try {record['acc_t2']:.3f}, "
            f"Δ i→c {record['delta_i2c']:+.3f}, Δ c→i {record['delta_c2i']:+.3f}")


def summarize(step_stats: dict) -> dict:
    """Per-step JSON line from the (gathered) per-sample lists. loss is already the global batch's (each
    rank's share divided by the global normaliser), so the ranks' parts add up; kl is a token mean."""
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return {"reward": mean(step_stats["reward"]), "solved": mean(step_stats["solved"]),
            "pass_any": mean(step_stats["pass_any"]), "signal_frac": mean(step_stats["signal"]),
            "kl": sum(step_stats["kl_sum"]) / max(sum(step_stats["kl_tokens"]), 1), "loss": sum(step_stats["loss"]),
            "grad_norm": mean(step_stats["grad_norm"]),
            "tokens_per_s": sum(step_stats["tokens"]) / max(max(step_stats["sample_s"]), 1e-9),
            "step_s": max(step_stats["step_s"]), "reflection_len": mean(step_stats["reflection_len"]),
            **({"repeat_frac": mean(step_stats["repeat"])} if step_stats.get("repeat") else {}),
            **({"attempt_solved": mean(step_stats["attempt_solved"])} if step_stats.get("attempt_solved") else {}),
            **({"phase": step_stats["phase"][0]} if step_stats.get("phase") else {})}


def update_stats(stats: dict) -> dict:
    """rl.update's numbers as the per-rank lists train_loop gathers."""
    return {"loss": [stats["loss"]], "kl_sum": [stats["kl_sum"]], "kl_tokens": [stats["kl_tokens"]],
            "grad_norm": [stats["grad_norm"]]}


# ---------------------------------------------------------------------------------------------- the loop

def train_loop(model, tok, optimizer, args, state: dict, items, test: list[dict], step_fn, describe=summarize,
               extra_state=None):
    """The step loop shared by R3, GRPO and SCoRe. Per step: the seeded global batch of items (a list, or
    a function of the step for runs whose data changes by phase), this rank's share of it with one seed
    per item (a function of the run's seed, the step and the item's place in the global batch, so the
    rank that samples it does not matter), step_fn(step, batch, seeds) -> dict of per-sample lists,
    gathered over ranks and turned into one metrics line by describe; an eval before the first step and
    periodic ones; checkpoints (state plus extra_state()). --token-budget ends the run after the step
    whose sampled tokens reach it. Everything follows from the step number and the checkpointed state,
    so --resume continues where the checkpoint left off."""
    rank, size = rl.world()
    params = [p for p in model.parameters() if p.requires_grad]
    budget = getattr(args, "token_budget", 0)
    state.setdefault("tokens", 0)
    if args.eval_every and state["step"] == 0:  # where training starts from, on the same held-out examples
        record = {"step": 0, "kind": "eval", **evaluate(model, tok, args, test, rank, size)}
        if rank == 0:
            print(eval_line(0, record))
            log_line(args, record)
    model.train()
    bar = cli.bar(iterable=range(state["step"], args.steps), initial=state["step"], total=args.steps,
                  desc=f"{args.method} {args.task}")
    for step in bar:
        if budget and state["tokens"] >= budget:
            break
        step_items = items(step) if callable(items) else items
        idx = batch_at(step, len(step_items), args.batch_size, args.seed)
        seeds = [mix_seed(args.seed, step, k) for k in range(len(idx))]
        with rollout.progress(f"step {step + 1}: rollouts", leave=False):
            stats = step_fn(step, my_share([step_items[i] for i in idx], rank, size), my_share(seeds, rank, size))
        record = {"step": step + 1, "kind": "train", **describe({k: rl.gather(v) for k, v in stats.items()})}
        state["tokens"] += sum(rl.gather(stats.get("tokens", []) + stats.get("extra_tokens", [])))
        record["tokens_total"] = state["tokens"]
        last = step + 1 == args.steps or bool(budget and state["tokens"] >= budget)
        if size > 1 and not rl.in_sync(params):
            raise RuntimeError(f"step {step + 1}: the ranks' adapters differ (a data-parallel bug)")
        bar.set_postfix(reward=f"{record['reward']:.3f}", signal=f"{record['signal_frac']:.2f}")
        cli.progress_line(f"step {step + 1}/{args.steps} {args.method} {args.task}"
                          + (f" ({record['phase']})" if "phase" in record else "")
                          + f": reward {record['reward']:.3f}, signal {record['signal_frac']:.2f}, "
                          f"{record.get('step_s', 0.0):.1f} s, {state['tokens']} tokens so far")
        if args.eval_every and ((step + 1) % args.eval_every == 0 or last):
            record.update(evaluate(model, tok, args, test, rank, size))
            bar.write(eval_line(step + 1, record))
        if rank == 0:
            log_line(args, record)
            if (step + 1) % args.save_every == 0 or last:
                rundir.save_checkpoint(args.out_dir, model, optimizer,
                                       {"step": step + 1, "data_pos": (step + 1) * args.batch_size,
                                        "tokens": state["tokens"], **(extra_state() if extra_state else {})})
        if size > 1:
            dist.barrier()
        if last:
            bar.update()  # the loop leaves before the bar counts this step: it would end one short
            bar.close()
            if budget and step + 1 < args.steps and rank == 0:
                bar.write(f"--token-budget {budget}: reached after step {step + 1} ({state['tokens']} tokens)")
            break
