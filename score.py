"""SCoRe -- Self-Correction via multi-turn REINFORCE (Kumar et al., arXiv 2409.12917), on the shared loop.

    python train_r3.py --method score --task math
    python train_r3.py --method score --task countdown --steps 20 --stage1-steps 10 --alpha 10

Per step, for a batch of training examples: G first attempts per example (rollout.attempt), then one
second attempt after each, asked for with the fixed correction instruction and no feedback
(rollout.correct). Both attempts are trained with REINFORCE and a KL penalty to the base model (the same
weights with the LoRA adapter off; rl.update does that through rl.reference_logprobs, per-sample beta):

  Stage I  (steps < --stage1-steps): reward only attempt 2; attempt 1 gets no reward, only the strong
           KL beta2, which holds it at the base model while attempt 2 learns to correct it (eq. 3 puts
           no KL on attempt 2; --stage1-beta-t2 adds one). The boundary is stored in the checkpoint:
           a resumed run keeps its own, whatever --steps says now.
  Stage II (the rest): reward both attempts (KL beta1), attempt 2 with the shaping bonus
           alpha * (r2 - r1): flipping wrong -> right pays, right -> wrong costs.

Baseline: each reward minus the mean of its group (the G samples of the same example and attempt
number; with G = 1, the batch mean). Not divided by the std, as in REINFORCE and unlike GRPO, so the
shaping bonus keeps its weight against the plain rewards. The turns are credited separately: attempt 1
is not credited with attempt 2's (shaped) reward, which would reward a wrong first attempt.
"""
import time

import torch

import cli
import loop
import rl
import rollout
from rollout import Gen
from sample import mix_seed


# ---------------------------------------------------------------------------------------------- the rewards

def stage(step: int, args) -> int:
    """1 for the first args.stage1_steps steps (0-based step numbers), 2 after. A function of the step
    alone, so a run resumed at any step is in the right stage."""
    return 1 if step < args.stage1_steps else 2


def shaped_rewards(r1, r2, alpha: float, stage: int):
    """(reward of attempt 1, reward of attempt 2) from the verifier's r1, r2 (floats or tensors).

    The paper's section 5, "Stage I: Training a Model Initialization to Prevent Collapse" (eq. 3): maximise
    r(y2) only; attempt 1 is held by the KL term (beta2), not rewarded. "Stage II: Multi-Turn RL with Reward
    Shaping" (eq. 4): maximise r(y1) + r(y2), attempt 2 with the bonus b(y2 | y1) = alpha * (r(y2) - r(y1)),
    alpha > 1 (paper: 10).
    """
    if stage == 1:
        return r1 * 0, r2
    return r1, r2 + alpha * (r2 - r1)


def baseline_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE with a baseline: reward minus its group's mean (consecutive runs of group_size rewards);
    with group_size 1 there is no group, and the mean over the global batch (every rank's) is the baseline."""
    if group_size == 1:
        total, count = rl.all_sum([rewards.float().sum().item(), len(rewards)])
        return rewards.float() - total / max(count, 1)
    r = rewards.float().view(-1, group_size)
    return (r - r.mean(1, keepdim=True)).view(-1)


def kl_betas(args, stage: int) -> tuple[float, float]:
    """KL coefficients of (attempt 1, attempt 2): in stage I beta2 holds attempt 1 to the base and attempt 2
    gets --stage1-beta-t2 (eq. 3: none); in stage II both get beta1 (eq. 4)."""
    return (args.beta2, args.stage1_beta_t2) if stage == 1 else (args.beta1, args.beta1)


# ---------------------------------------------------------------------------------------------- one step

def score_step(model, tok, optimizer, args, cfg: rl.UpdateConfig, examples: list[dict], step: int, seeds: list[int]):
    """Two attempts per sample, shaped rewards, one REINFORCE update on both attempts' tokens."""
    t0 = time.perf_counter()
    G = args.group_size
    first = rollout.attempt(model, tok, args.task, examples, Gen(args.max_new_tokens, args.temperature,
                                                                 seed=seeds), n=G, keep=True)
    second = rollout.correct(model, tok, args.task, [ex for ex in examples for _ in range(G)], first,
                             Gen(args.max_new_tokens, args.temperature,
                                 seed=[mix_seed(mix_seed(s, 1), j) for s in seeds for j in range(G)]))
    t_sample = time.perf_counter() - t0
    c1 = [float(t.verdict.correct) for t in first]
    c2 = [float(t.verdict.correct) for t in second]
    r1 = torch.tensor([loop.reward(t.verdict, args.reward) for t in first])  # = c1 unless --reward partial
    r2 = torch.tensor([loop.reward(t.verdict, args.reward) for t in second])
    s = stage(step, args)
    reward1, reward2 = shaped_rewards(r1, r2, args.alpha, s)
    adv1, adv2 = baseline_advantages(reward1, G), baseline_advantages(reward2, G)
    kl1, kl2 = kl_betas(args, s)
    # Every sample goes in, also those with advantage 0: their KL term still holds them to the base.
    samples = [rl.Sample(t.prompt_ids, t.ids, a.item(), kl1) for t, a in zip(first, adv1)] + \
              [rl.Sample(t.prompt_ids, t.ids, a.item(), kl2) for t, a in zip(second, adv2)]
    stats = rl.update(model, optimizer, samples, cfg, tok.pad_token_id)
    signal = ((adv1 != 0) | (adv2 != 0)).view(-1, G).any(1) if G > 1 else (adv1 != 0) | (adv2 != 0)
    return {"reward": r2.tolist(), "solved": c2, "c1": c1, "shaped": reward2.tolist(), "stage": [s],
            "pass_any": torch.tensor(c2).view(-1, G).max(1).values.tolist(), "signal": signal.float().tolist(),
            "tokens": [sum(len(t.ids) for t in first + second)], "reflection_len": [], "sample_s": [t_sample],
            "step_s": [time.perf_counter() - t0], **loop.update_stats(stats)}


def describe(stats: dict) -> dict:
    """The metrics line: loop.summarize (reward = mean r2) plus SCoRe's own numbers on the training
    samples: accuracy at each attempt, the flips wrong->right (i2c) and right->wrong (c2i), the stage.
    (acc_t1 / acc_t2 without the train_ prefix are the held-out eval's, added on eval steps.)"""
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    r1, r2 = stats["c1"], stats["solved"]  # correctness at each attempt
    summary = loop.summarize(stats)
    del summary["reflection_len"]  # R3's; SCoRe has no reflections
    return {"stage": stats["stage"][0], **summary, "train_acc_t1": mean(r1),
            "train_acc_t2": mean(r2), "train_i2c": mean([float(a == 0 and b == 1) for a, b in zip(r1, r2)]),
            "train_c2i": mean([float(a == 1 and b == 0) for a, b in zip(r1, r2)]),
            "shaped_reward": mean(stats["shaped"])}


# ---------------------------------------------------------------------------------------------- the run

def train(model, tok, optimizer, args, state: dict, train: list[dict], test: list[dict]):
    """SCoRe's two stages on the shared loop (seeded batches, logging, eval in score mode, checkpoints)."""
    if "stage1_steps" in state and state["stage1_steps"] != args.stage1_steps:
        if rl.world()[0] == 0:
            print(f"SCoRe: keeping the checkpoint's stage boundary, --stage1-steps {state['stage1_steps']} "
                  f"(not {args.stage1_steps})")
        args.stage1_steps = state["stage1_steps"]
    if args.group_size < 1 or args.batch_size < 1:
        raise cli.UsageError("--group-size and --batch-size must be at least 1")
    if args.stage1_steps < 0:
        raise cli.UsageError(f"--stage1-steps must be at least 0, not {args.stage1_steps}")
    if not train:
        raise cli.UsageError("no training examples (--train-size 0?)")
    if rl.world()[0] == 0 and state["step"] < args.steps:
        stages = f"stage I for steps 1-{args.stage1_steps}, stage II after" if args.stage1_steps else "stage II only"
        print(f"SCoRe: {stages} (alpha {args.alpha}, beta1 {args.beta1}, beta2 {args.beta2})")
    cfg = rl.UpdateConfig(args.beta1, args.clip_eps, args.updates_per_batch, args.micro_batch, args.micro_batch_tokens,
                          agg=args.loss_agg,
                          temperature=args.temperature)
    loop.train_loop(model, tok, optimizer, args, state, train, test,
                    lambda step, batch, seeds: score_step(model, tok, optimizer, args, cfg, batch, step, seeds),
                    describe=describe, extra_state=lambda: {"stage1_steps": args.stage1_steps})
