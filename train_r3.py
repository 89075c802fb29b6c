"""Reflect, Retry, Reward (R3; arXiv 2505.24726) with a hand-written GRPO loop.

    python train_r3.py --task countdown                       # R3 on the embedded model, CPU defaults
    python train_r3.py --task countdown --method grpo         # the plain single-turn GRPO baseline
    python train_r3.py --task math --method score             # SCoRe (score.py)
    python train_r3.py --task code --method rerest            # Re-ReST (rerest.py)
    torchrun --nproc_per_node=2 train_r3.py --task countdown  # data parallel (nccl on GPUs, gloo on CPUs)

R3, per step: take failed first attempts from the failure dataset; sample a group of G reflections
for each; retry once after each reflection; reward = the verifier on the retry; GRPO on the
reflection tokens only. GRPO: sample G first attempts; reward = the verifier; GRPO on the attempts.
Ours, not the paper's (flags; on by default only for the embedded model on countdown, config.EMBEDDED_COUNTDOWN):
a GRPO warm-up before the R3 steps; a failure set rebuilt as the policy improves and kept to near misses
(--failure-credit); the first try and the retry trained beside the reflection (--train-attempts, --train-retries);
a retry below its attempt earns 0 (--retry-reward no-worse) and a copied answer loses advantage
(--repeat-advantage). Off by default: a failure set of the queries the policy sometimes solves (--solvable-k).
"""
import json
import os
import time

import torch
import torch.distributed as dist

import cli
import config
import loop
import rerest
import rl
import rollout
import rundir
import score
import tasks
import verifiers
from model import resolve
from rollout import Gen
from sample import mix_seed


def parse_args(argv=None):
    """The flags, their presets and checks (config.py), with this file's docstring as --help's description."""
    return config.parse_args(argv, description=__doc__)


# ---------------------------------------------------------------------------------------------- the data

FAILURE_SET_TAG = 1 << 40  # a seed stream of its own for the failure set's first attempts


def failure_dataset(model, tok, args, train: list[dict], rank: int, size: int,
                    at_step: int = 0) -> tuple[list[dict], int]:
    """R3's training set: the queries whose sampled first attempt fails (--solvable-k K: some of K fail and
    some pass), each with its failed attempt, in the order of train, sampled by the policy as it is after
    at_step steps (0: before training, the paper's); and the tokens that sampling cost. Cached in the run
    directory (with what made it) and reused by later runs that match, so a resumed run trains on the same
    set as an uninterrupted one."""
    path = args.out_dir / ("failures.jsonl" if at_step == 0 else f"failures-step{at_step:06d}.jsonl")
    k = args.solvable_k  # 0: one attempt per query, kept if it fails (the paper's)
    meta = {"model": args.model, "task": args.task, "source": args.source, "seed": args.seed,
            "n": len(train), "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "init_adapter": args.init_adapter, "at_step": at_step,
            **({"solvable_k": k} if k else {}),  # only when set: caches written before the flag stay valid
            **({"failure_credit": args.failure_credit} if args.failure_credit else {})}
    cached = read_failures(path, meta, rank)
    if cached is not None:
        return cached
    mine = loop.my_share(list(range(len(train))), rank, size)
    seeds = [mix_seed(args.seed, FAILURE_SET_TAG + at_step, i) for i in mine]  # by query, not by rank
    n = max(k, 1)
    with rollout.progress(f"failure set: {n} first attempt(s) on each of {len(train)} queries (after step {at_step})"):
        turns = rollout.attempt(model, tok, args.task, [train[i] for i in mine], Gen(args.max_new_tokens,
                                args.temperature, seed=seeds), n=n)
    rows = []
    for j, i in enumerate(mine):
        failed = [t for t in turns[j * n:(j + 1) * n] if not t.verdict.correct]
        # --failure-credit C: only near misses (partial credit >= C) are kept as the attempt to reflect on
        near = [t for t in failed if loop.reward(t.verdict, "partial") >= args.failure_credit]
        # --solvable-k: a query every sample fails gives retries that almost never pass, so no reward says
        # which reflection helped; one every sample passes has no failure to reflect on
        if near and (not k or len(failed) < n):
            rows.append((i, {"example": train[i], "attempt": near[0].text}))
    rows = [row for _, row in sorted(rl.gather(rows), key=lambda r: r[0])]
    tokens = sum(rl.gather([sum(len(t.ids) for t in turns)]))
    if rank == 0:
        kept = f"both failed and passed in {k} samples (pass@{k} > 0)" if k else "first attempts failed"
        kept += f", with partial credit >= {args.failure_credit}" if args.failure_credit else ""
        print(f"failure set after step {at_step}: {len(rows)} of {len(train)} {kept}; cached in {path}")
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(json.dumps(r) for r in [{**meta, "tokens": tokens}] + rows) + "\n")
        os.replace(tmp, path)
    return rows, tokens


def read_failures(path, meta: dict, rank: int) -> tuple[list[dict], int] | None:
    """The cached failure set and its token cost if it was made with meta, else None. It is a cache: a damaged one (a kill
    mid-write on another filesystem, an edit) is rebuilt, with a line saying so."""
    if not path.exists():
        return None
    try:
        lines = path.read_text().splitlines()
        head = json.loads(lines[0])
        if {k: v for k, v in head.items() if k != "tokens"} != meta:
            return None
        rows = [json.loads(line) for line in lines[1:]]
        if all(isinstance(r, dict) and isinstance(r.get("example"), dict) and isinstance(r.get("attempt"), str)
               for r in rows) and isinstance(head.get("tokens", 0), int):
            return rows, head.get("tokens", 0)
    except (ValueError, IndexError, OSError):
        pass
    if rank == 0:
        print(f"{path}: damaged cache of the failure set; rebuilding it")
    return None


# ---------------------------------------------------------------------------------------------- one step

def r3_samples(model, tok, args, queries: list[dict], seeds: list[int]):
    """R3 steps 2-4 for a batch of failed queries. The trained "completion" is the reflection; its
    prompt holds the task and the failed attempt; the retry only decides the reward."""
    examples = [q["example"] for q in queries]
    attempts = [rollout.Turn(tasks.first_attempt_messages(args.task, ex), [], [], q["attempt"])
                for ex, q in zip(examples, queries)]
    episodes = rollout.reflect_and_retry(
        model, tok, args.task, examples, attempts, Gen(args.reflect_tokens, args.temperature, seed=seeds),
        Gen(args.max_new_tokens, args.temperature, seed=[mix_seed(s, 1) for s in seeds]), n_reflections=args.group_size,
        reflect_prompt=args.reflect_prompt, retry_context=args.retry_context)
    reflections = [r for ep in episodes for r in ep.reflections]
    retries = [t for ep in episodes for t in ep.retries]
    verdicts = [t.verdict for t in retries]
    repeats = [verifiers.same_answer(args.task, t.text, q["attempt"]) for ep, q in zip(episodes, queries)
               for t in ep.retries]
    # --retry-reward progress / no-worse: each retry is paid against its failed attempt's verdict (judged once per query)
    before = [v for q, ex in zip(queries, examples)
              for v in [tasks.verify(args.task, q["attempt"], ex)] * args.group_size] \
        if args.retry_reward != "verifier" else None
    return reflections, verdicts, {"tokens": sum(len(t.ids) for ep in episodes for t in ep.reflections + ep.retries),
                                  "reflection_len": [len(r.ids) for r in reflections], "repeat": repeats,
                                  "attempt_verdicts": before, "retries": retries}


def grpo_samples(model, tok, args, queries: list[dict], seeds: list[int]):
    """Plain GRPO: the trained completion is the first attempt itself."""
    examples = [q["example"] for q in queries]
    turns = rollout.attempt(model, tok, args.task, examples, Gen(args.max_new_tokens, args.temperature,
                                                                 seed=seeds), n=args.group_size)
    return turns, [t.verdict for t in turns], {"tokens": sum(len(t.ids) for t in turns), "reflection_len": [],
                                               "repeat": [], "attempt_verdicts": None}


def group_samples(turns, rewards: torch.Tensor, G: int, skip_flat: bool,
                  repeat_shift: torch.Tensor | None = None) -> tuple[list, torch.Tensor]:
    """GRPO's training samples from groups of G turns and their rewards, and which groups carry signal.
    A group whose rewards are all equal has advantage 0, but its KL term still pulls toward the base and
    it counts in the normaliser, as in TRL. skip_flat (--skip-flat-groups) leaves it out (no backward pass).
    repeat_shift (--repeat-advantage): added to each sample's advantage after the normalisation, which would
    cancel it; a group with a nonzero shift is never skipped (the signal it returns stays the rewards')."""
    signal = rl.has_signal(rewards, G)
    advantages, keep = rl.group_advantages(rewards, G), signal
    if repeat_shift is not None:
        advantages, keep = advantages + repeat_shift, signal | (repeat_shift.view(-1, G) != 0).any(1)
    samples = [rl.Sample(t.prompt_ids, t.ids, a.item()) for i, (t, a) in enumerate(zip(turns, advantages))
               if keep[i // G] or not skip_flat]
    return samples, signal


def train_step(model, tok, optimizer, args, cfg, queries, seeds, method: str, reward_kind: str):
    """Sample, reward, and one GRPO update (DeepSeekMath eq. 3) on this rank's share of the batch."""
    t0 = time.perf_counter()
    make = r3_samples if method == "r3" else grpo_samples
    turns, verdicts, info = make(model, tok, args, queries, seeds)
    # R3: the retry's verdict; --repeat-reward for a retry that repeats the failed attempt; --retry-reward
    # progress / no-worse: the retry against that attempt
    # (a warm-up step is GRPO inside an R3 run: it has no retry, so neither applies)
    repeat_reward, rule = (args.repeat_reward, args.retry_reward) if method == "r3" else (None, "verifier")
    before = info["attempt_verdicts"] or [None] * len(verdicts)
    rewards = torch.tensor([loop.retry_reward(v, rep, reward_kind, repeat_reward, b, rule)
                            for v, rep, b in zip(verdicts, info["repeat"] or [False] * len(verdicts), before)])
    G = args.group_size
    # --repeat-advantage A (ours, A <= 0): added to the advantage of a reflection (and its retry) whose failed retry
    # copied the failed answer, whatever its group did. A reward for a copy cannot do this: when all G retries copy,
    # all earn the same and the group's advantage is 0 (the copy trap, docs/self_correction.md). UFO's repeat
    # penalty (arXiv 2507.14295), moved outside GRPO's baseline.
    shift = torch.tensor([args.repeat_advantage * loop.copied(v, rep) for v, rep in zip(verdicts, info["repeat"])]) \
        if method == "r3" and args.repeat_advantage else None
    samples, signal = group_samples(turns, rewards, G, args.skip_flat_groups, shift)
    if method == "r3" and args.train_retries:  # each retry with its reflection's advantage (ours; the paper
        samples += group_samples(info["retries"], rewards, G, args.skip_flat_groups, shift)[0]  # trains reflections only)
    extra = {}
    if method == "r3" and args.train_attempts:  # plain GRPO on the same queries' first attempts, same update
        tries, tried, tried_info = grpo_samples(model, tok, args, queries, [mix_seed(s, 2) for s in seeds])
        samples += group_samples(tries, torch.tensor([loop.reward(v, reward_kind) for v in tried]), G,
                                 args.skip_flat_groups)[0]
        info["tokens"] += tried_info["tokens"]
        extra = {"attempt_solved": [float(v.correct) for v in tried]}
    t_sample = time.perf_counter() - t0
    stats = rl.update(model, optimizer, samples, cfg, tok.pad_token_id)
    solved = torch.tensor([float(v.correct) for v in verdicts])
    return {"reward": rewards.tolist(), "solved": solved.tolist(), "pass_any": solved.view(-1, G).max(1).values.tolist(),
            "signal": signal.tolist(), "tokens": [info["tokens"]], "reflection_len": info["reflection_len"],
            "repeat": [float(r) for r in info["repeat"]], **extra,
            "sample_s": [t_sample], "step_s": [time.perf_counter() - t0], **loop.update_stats(stats)}


def r3_phases(model, tok, optimizer, args, cfg, train: list[dict], rank: int, size: int):
    """R3's run as (items, step_fn) for loop.train_loop. Steps before --warmup-steps are plain GRPO on
    first attempts; the rest are R3 on the failure set, built after the warm-up and, with
    --refresh-failures N, rebuilt every N R3 steps from the policy as it is then (the paper builds it
    once, before training). Each phase follows from the step number, so --resume lands in the right one."""
    warm, every, current = args.warmup_steps, args.refresh_failures, {}  # current: {built_at: (rows, tokens)}

    def built_at(step: int) -> int:  # the step after which the failure set for `step` is sampled
        return warm + ((step - warm) // every * every if every else 0)

    def items(step: int) -> list[dict]:
        if step < warm:
            return [{"example": ex} for ex in train]
        at = built_at(step)
        if at not in current:
            current.clear()  # one set in memory at a time
            current[at] = failure_dataset(model, tok, args, train, rank, size, at)
            if not current[at][0] and args.failure_credit:
                raise cli.UsageError(f"after step {at} no kept query had a failed attempt with partial credit >= "
                                     f"--failure-credit {args.failure_credit}: no failures to learn from (try a "
                                     "lower --failure-credit or a larger --train-size)")
            if not current[at][0]:
                raise cli.UsageError(
                    f"after step {at} no query both failed and passed in --solvable-k {args.solvable_k} samples: no "
                    "failures to learn from (try a larger --solvable-k or --train-size, or --solvable-k 0)"
                    if args.solvable_k else f"after step {at} every first attempt passed: no failures to learn from "
                    "(try a harder --source)")
        return current[at][0]

    def step_fn(step: int, batch: list[dict], seeds: list[int]) -> dict:
        phase = "warmup" if step < warm else "r3"
        stats = train_step(model, tok, optimizer, args, cfg, batch, seeds, "grpo" if phase == "warmup" else "r3",
                           args.warmup_reward if phase == "warmup" else args.reward)
        # the failure set's sampling counts toward --token-budget, at the step that first uses the set
        built = current[step][1] if phase == "r3" and step == built_at(step) and rank == 0 else 0
        return {**stats, "phase": [phase], "extra_tokens": [built]}
    return items, step_fn


# ---------------------------------------------------------------------------------------------- the run

def main(argv=None):
    args = parse_args(argv)
    # The data first: a bad --source fails in a second, not after loading the model.
    train = tasks.load_examples(args.task, "train", source=args.source, n=args.train_size, seed=args.seed)
    test = tasks.load_examples(args.task, "test", source=args.source, n=args.eval_size, seed=args.seed)
    if not train:
        raise cli.UsageError(f"no training examples for {args.task} from {args.source or 'the default source'}")
    # Then the model's name and the trackers, before the run directory: errors in the order a user fixes them.
    resolve(args.model)
    if int(os.environ.get("RANK", "0")) == 0:
        loop.check_trackers(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(config.header(args))
    model, tok, optimizer, state, rank, size = loop.setup(args)
    train = loop.fit_context(model, tok, args, train, "train")
    test = loop.fit_context(model, tok, args, test, "eval", mode="score" if args.method == "score" else "r3")
    if args.method in ("score", "rerest"):
        (score if args.method == "score" else rerest).train(model, tok, optimizer, args, state, train, test)
    else:
        cfg = rl.UpdateConfig(args.kl_beta, args.clip_eps, args.updates_per_batch, args.micro_batch,
                              args.micro_batch_tokens, agg=args.loss_agg, temperature=args.temperature)
        if args.method == "r3":
            items, step_fn = r3_phases(model, tok, optimizer, args, cfg, train, rank, size)
        else:
            items = [{"example": ex} for ex in train]
            step_fn = lambda step, batch, seeds: train_step(model, tok, optimizer, args, cfg, batch,  # noqa: E731
                                                            seeds, "grpo", args.reward)
        loop.train_loop(model, tok, optimizer, args, state, items, test, step_fn)
    loop.close_trackers()
    if rank == 0:
        print(f"done: {args.out_dir}/metrics.jsonl, adapter in {rundir.latest_checkpoint(args.out_dir)}/adapter")
    if size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    cli.run(main)
