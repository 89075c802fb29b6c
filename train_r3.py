"""Reflect, Retry, Reward (R3; arXiv 2505.24726) with a hand-written GRPO loop.

    python train_r3.py --task countdown                       # R3 on the embedded model, CPU defaults
    python train_r3.py --task countdown --method grpo         # the plain single-turn GRPO baseline
    python train_r3.py --task math --method score             # SCoRe (score.py)
    python train_r3.py --task code --method rerest            # Re-ReST (rerest.py)
    torchrun --nproc_per_node=2 train_r3.py --task countdown  # data parallel (nccl on GPUs, gloo on CPUs)

R3, per step: take failed first attempts from the failure dataset; sample a group of G reflections
for each; retry once after each reflection; reward = the verifier on the retry; GRPO on the
reflection tokens only. GRPO: sample G first attempts; reward = the verifier; GRPO on the attempts.
"""
import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import cli
import rl
import rollout
import tasks
from model import DEFAULT_MODEL, load_model
from rollout import Gen

TASK_TOKENS = {"countdown": 48, "function_calling": 128, "math": 256, "code": 256}  # answer lengths
# --reward partial: some credit for failing closer to a pass, a denser signal for small models that
# almost never pass (our choice, not the paper's; the papers and eval.py use the binary verdict).
PARTIAL_CREDIT = {"invalid_equation": 0.1, "wrong_numbers": 0.25, "missed_target": 0.5, "wrong_tool": 0.1,
                  "wrong_arguments": 0.5, "runtime_error": 0.1, "wrong_answer": 0.25}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="countdown", choices=tasks.TASK_NAMES)
    p.add_argument("--source", default=None, help="task data: a built-in source name, a local file or a Hub id "
                   f"(defaults: {tasks.DEFAULT_SOURCE})")
    p.add_argument("--method", default="r3", choices=["r3", "grpo", "score", "rerest"])
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded model, Hub id, local dir or .gguf file")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (all linear layers)")
    p.add_argument("--4bit", dest="load_in_4bit", action="store_true", help="NF4 4-bit base weights (QLoRA)")
    p.add_argument("--group-size", type=int, default=4, help="G: reflections (r3) or attempts (grpo) per query")
    p.add_argument("--batch-size", type=int, default=4, help="queries per step (all ranks together)")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward")
    p.add_argument("--updates-per-batch", type=int, default=1, help=">1 reuses a batch with PPO ratio clipping")
    p.add_argument("--clip-eps", type=float, default=0.2)
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (LoRA); not published by R3")
    p.add_argument("--kl-beta", type=float, default=0.001, help="KL to the base model (R3: 0.001, k3 estimator)")
    p.add_argument("--loss-agg", default="grpo", choices=["grpo", "token"],
                   help="grpo: per-sequence token mean; token: mean over all tokens (DAPO)")
    p.add_argument("--max-new-tokens", type=int, default=None, help=f"attempt/retry length (default per task: {TASK_TOKENS})")
    p.add_argument("--reflect-tokens", type=int, default=64, help="reflection length")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--reward", default="binary", choices=["binary", "partial"],
                   help=f"binary: 1 if the verifier passes (the paper); partial: also {PARTIAL_CREDIT}")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--train-size", type=int, default=64, help="training queries (first attempts sampled on these)")
    p.add_argument("--eval-size", type=int, default=32, help="held-out examples for the periodic eval")
    p.add_argument("--eval-every", type=int, default=10, help="steps between evals (0: never)")
    p.add_argument("--save-every", type=int, default=5, help="steps between checkpoints")
    p.add_argument("--out-dir", default=None, help="run directory (default runs/<task>-<method>)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    p.add_argument("--seed", type=int, default=0)
    # SCoRe and Re-ReST (score.py, rerest.py) read their own flags from the same namespace.
    p.add_argument("--alpha", type=float, default=10.0, help="SCoRe reward-shaping bonus alpha (paper: 10)")
    p.add_argument("--beta1", type=float, default=0.01, help="SCoRe KL coefficient beta1 (paper: 0.01)")
    p.add_argument("--beta2", type=float, default=0.1, help="SCoRe stage-I KL on attempt 1, beta2 (paper: 0.1 MATH)")
    p.add_argument("--stage1-steps", type=int, default=None, help="SCoRe stage I steps (default: half of --steps)")
    p.add_argument("--k", type=int, default=4, help="Re-ReST: samples per input")
    p.add_argument("--sft-epochs", type=int, default=3, help="Re-ReST: epochs of supervised fine-tuning (paper: 3)")
    args = p.parse_args(argv)
    args.max_new_tokens = args.max_new_tokens or TASK_TOKENS[args.task]
    args.out_dir = Path(args.out_dir or f"runs/{args.task}-{args.method}")
    args.stage1_steps = args.steps // 2 if args.stage1_steps is None else args.stage1_steps
    return args


# ---------------------------------------------------------------------------------------------- the data

def failure_dataset(model, tok, args, train: list[dict], rank: int, size: int) -> list[dict]:
    """R3's training set: the queries whose sampled first attempt fails, each with that attempt.
    Cached in the run directory (with what made it) and reused by later runs that match."""
    path = args.out_dir / "failures.jsonl"
    meta = {"model": args.model, "task": args.task, "source": args.source, "seed": args.seed,
            "n": len(train), "max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    if path.exists():
        lines = path.read_text().splitlines()
        if lines and json.loads(lines[0]) == meta:
            return [json.loads(line) for line in lines[1:]]
    mine = train[rank::size]
    gen = Gen(args.max_new_tokens, args.temperature, seed=args.seed * 7919 + rank)
    turns = rollout.attempt(model, tok, args.task, mine, gen)
    rows = [{"example": ex, "attempt": t.text} for ex, t in zip(mine, turns) if not t.verdict.correct]
    rows = rl.gather(rows)
    if rank == 0:
        print(f"failure dataset: {len(rows)} of {len(train)} first attempts failed; cached in {path}")
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(json.dumps(r) for r in [meta] + rows) + "\n")
        os.replace(tmp, path)
    return rows


def batch_at(step: int, n_items: int, batch_size: int, seed: int) -> list[int]:
    """Indices of step's batch: epochs of a seeded shuffle, so the data position follows from the step."""
    idx = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n_items)
        idx.append(torch.randperm(n_items, generator=torch.Generator().manual_seed(seed + epoch))[pos].item())
    return idx


# ---------------------------------------------------------------------------------------------- one step

def r3_samples(model, tok, args, queries: list[dict], step_seed: int):
    """R3 steps 2-4 for a batch of failed queries. The trained "completion" is the reflection; its
    prompt holds the task and the failed attempt; the retry only decides the reward."""
    examples = [q["example"] for q in queries]
    attempts = [rollout.Turn(tasks.first_attempt_messages(args.task, ex), [], [], q["attempt"])
                for ex, q in zip(examples, queries)]
    episodes = rollout.reflect_and_retry(
        model, tok, args.task, examples, attempts, Gen(args.reflect_tokens, args.temperature, seed=step_seed),
        Gen(args.max_new_tokens, args.temperature, seed=step_seed + 1), n_reflections=args.group_size)
    reflections = [r for ep in episodes for r in ep.reflections]
    verdicts = [t.verdict for ep in episodes for t in ep.retries]
    return reflections, verdicts, {"tokens": sum(len(t.ids) for ep in episodes for t in ep.reflections + ep.retries),
                                  "reflection_len": [len(r.ids) for r in reflections]}


def grpo_samples(model, tok, args, queries: list[dict], step_seed: int):
    """Plain GRPO: the trained completion is the first attempt itself."""
    examples = [q["example"] for q in queries]
    turns = rollout.attempt(model, tok, args.task, examples, Gen(args.max_new_tokens, args.temperature,
                                                                 seed=step_seed), n=args.group_size)
    return turns, [t.verdict for t in turns], {"tokens": sum(len(t.ids) for t in turns), "reflection_len": []}


def reward(verdict, kind: str = "binary") -> float:
    if verdict.correct:
        return 1.0
    return PARTIAL_CREDIT.get(verdict.error, 0.0) if kind == "partial" else 0.0


def train_step(model, tok, optimizer, args, cfg, queries, step_seed):
    """Sample, reward, and one GRPO update on the groups that carry signal."""
    t0 = time.perf_counter()
    make = r3_samples if args.method == "r3" else grpo_samples
    turns, verdicts, info = make(model, tok, args, queries, step_seed)
    t_sample = time.perf_counter() - t0
    rewards = torch.tensor([reward(v, args.reward) for v in verdicts])
    G = args.group_size
    advantages = rl.group_advantages(rewards, G)
    signal = rl.has_signal(rewards, G)
    # A group whose rewards are all equal has zero advantage: no gradient, so no backward pass.
    samples = [rl.Sample(t.prompt_ids, t.ids, a.item()) for i, (t, a) in enumerate(zip(turns, advantages))
               if signal[i // G]]
    stats = {"loss": 0.0, "kl": 0.0, "grad_norm": 0.0}
    if rl.gather([len(samples)]) != [0] * rl.world()[1]:  # every rank steps together, or none does
        stats = rl.update(model, optimizer, samples, cfg, tok.pad_token_id)
    solved = torch.tensor([float(v.correct) for v in verdicts])
    return {"reward": rewards.tolist(), "solved": solved.tolist(), "pass_any": solved.view(-1, G).max(1).values.tolist(), "signal": signal.tolist(),
            "tokens": [info["tokens"]], "reflection_len": info["reflection_len"], "sample_s": [t_sample],
            "step_s": [time.perf_counter() - t0], **{k: [v] for k, v in stats.items()}}


# ---------------------------------------------------------------------------------------------- the run

def setup(args):
    """Process group (under torchrun), seeds, run directory, model, optimizer, resumed state."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, size = rl.world()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed + rank)
    if args.lora_r <= 0:
        raise cli.UsageError("training needs --lora-r > 0 (the base model with the adapter off is the KL reference)")
    ckpt = rl.latest_checkpoint(args.out_dir) if args.resume else None
    if args.resume and ckpt is None:
        raise cli.UsageError(f"--resume: no checkpoint in {args.out_dir}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model, lora_r=args.lora_r, load_in_4bit=args.load_in_4bit, device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    state = {"step": 0}
    if ckpt is not None:
        state = rl.load_checkpoint(ckpt, model, optimizer)
        if rank == 0:
            print(f"resumed from {ckpt} at step {state['step']}")
    if rank == 0:
        (args.out_dir / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1))
    return model, tok, optimizer, state, rank, size


def log_line(args, record: dict):
    with open(args.out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def evaluate(model, tok, args, test: list[dict], rank: int, size: int) -> dict:
    """First- and second-try accuracy on the held-out split (greedy), shared out over ranks."""
    model.eval()
    gen = Gen(args.max_new_tokens, temperature=0)
    mode = "score" if args.method == "score" else "r3"
    first, second = rollout.two_tries(model, tok, args.task, test[rank::size], gen, mode,
                                      Gen(args.reflect_tokens, temperature=0))
    model.train()
    t1 = rl.gather([t.verdict.correct for t in first])
    t2 = rl.gather([t.verdict.correct for t in second])
    return {"acc_t1": sum(t1) / max(len(t1), 1), "acc_t2": sum(t2) / max(len(t2), 1)}


def summarize(step_stats: dict) -> dict:
    """Per-step JSON line from the (gathered) per-sample lists."""
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return {"reward": mean(step_stats["reward"]), "solved": mean(step_stats["solved"]), "pass_any": mean(step_stats["pass_any"]),
            "signal_frac": mean(step_stats["signal"]), "kl": mean(step_stats["kl"]), "loss": sum(step_stats["loss"]),
            "grad_norm": mean(step_stats["grad_norm"]),
            "tokens_per_s": sum(step_stats["tokens"]) / max(max(step_stats["sample_s"]), 1e-9),
            "step_s": max(step_stats["step_s"]), "reflection_len": mean(step_stats["reflection_len"])}


def train_loop(model, tok, optimizer, args, state: dict, items: list, test: list[dict], step_fn, describe=summarize):
    """The step loop shared by R3, GRPO and SCoRe. Per step: a seeded batch of items (this rank's share),
    step_fn(step, batch, step_seed) -> dict of per-sample lists, gathered over ranks and turned into one
    metrics line by describe; periodic eval and checkpoints. Everything follows from the step number,
    so --resume continues where the checkpoint left off."""
    rank, size = rl.world()
    model.train()
    bar = tqdm(range(state["step"], args.steps), initial=state["step"], total=args.steps, disable=rank != 0,
               desc=f"{args.method} {args.task}")
    for step in bar:
        idx = batch_at(step, len(items), args.batch_size, args.seed)[rank::size]
        stats = step_fn(step, [items[i] for i in idx], (args.seed * 1_000_003 + step) * 10_007 + rank * 101)
        record = {"step": step + 1, "kind": "train", **describe({k: rl.gather(v) for k, v in stats.items()})}
        bar.set_postfix(reward=f"{record['reward']:.3f}", signal=f"{record['signal_frac']:.2f}")
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            record.update(evaluate(model, tok, args, test, rank, size))
            bar.write(f"step {step + 1}: eval first try {record['acc_t1']:.3f}, second try {record['acc_t2']:.3f}")
        if rank == 0:
            log_line(args, record)
            if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
                rl.save_checkpoint(args.out_dir, model, optimizer, {"step": step + 1, "data_pos": (step + 1) * args.batch_size})
        if size > 1:
            dist.barrier()


def main(argv=None):
    args = parse_args(argv)
    # The data first: a bad --source fails in a second, not after loading the model.
    train = tasks.load_examples(args.task, "train", source=args.source, n=args.train_size, seed=args.seed)
    test = tasks.load_examples(args.task, "test", source=args.source, n=args.eval_size, seed=args.seed)
    model, tok, optimizer, state, rank, size = setup(args)
    if args.method in ("score", "rerest"):
        import rerest
        import score
        (score if args.method == "score" else rerest).train(model, tok, optimizer, args, state, train, test)
    else:
        queries = failure_dataset(model, tok, args, train, rank, size) if args.method == "r3" else \
            [{"example": ex} for ex in train]
        if not queries:
            raise cli.UsageError("every first attempt passed: no failures to learn from (try a harder --source)")
        cfg = rl.UpdateConfig(args.kl_beta, args.clip_eps, args.updates_per_batch, args.micro_batch,
                              agg=args.loss_agg, temperature=args.temperature)
        train_loop(model, tok, optimizer, args, state, queries, test,
                   lambda step, batch, step_seed: train_step(model, tok, optimizer, args, cfg, batch, step_seed))
    if rank == 0:
        print(f"done: {args.out_dir}/metrics.jsonl, adapter in {rl.latest_checkpoint(args.out_dir)}/adapter")
    if size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    cli.run(main)
