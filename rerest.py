"""Re-ReST -- Reflection-Reinforced Self-Training (Dou et al., arXiv 2406.01495), on the shared loop.

    python train_r3.py --method rerest --task code
    python train_r3.py --method rerest --task countdown --k 4 --sft-epochs 3

One round of self-training:
  1. Sample. The agent samples --k outputs per training input (temperature --temperature); the verifier
     scores them. The passing ones form D_M.
  2. Reflect. For each failed output the reflector is given the input, the failed output and the
     verifier's feedback (its error category and message) and writes a corrected output.
  3. Train the reflector first: supervised (token-mean NLL) on its own passing corrections
     (reflector prompt -> correction). The trained reflector then corrects the same failures once more.
     The passing corrections of both passes form D_R.
  4. Train the agent: supervised, --sft-epochs epochs at --lr on D_M + D_R, each item being
     (the task's first-attempt prompt -> a passing output). An output identical to one already kept for
     the same input is kept once.
  5. Evaluate the agent alone (loop.evaluate; acc_t1 is the agent's own accuracy) and save its
     adapter, in standard peft form, in a checkpoint (eval.py --adapter <out-dir> reads it).

The reflector is the same base model with its own LoRA adapter: a second named peft adapter
("reflector"), added next to the agent's and switched in with set_adapter, so there is no second model
in memory and no weight swapping by hand. It starts at zero, that is as the base model. It lives for one
round, is written to <out-dir>/reflector/ for inspection, and is deleted before the agent's checkpoint,
so the checkpoint holds the agent alone.

--resume runs one more round from the saved agent (iterated self-training). --steps is not used.
"""
import copy
import math
from contextlib import contextmanager

import torch

import cli
import loop
import rl
import rollout
import rundir
import tasks
from rollout import Gen, Turn
from sample import mix_seed

REFLECTOR = "reflector"  # the reflector's peft adapter name


# ---------------------------------------------------------------------------------------------- the reflector

def reflector_messages(task: str, example: dict, failed: str, verdict) -> list[dict]:
    """The reflector's prompt: the task as the agent saw it, the failed output and the verifier's feedback,
    then a request for a corrected output in the task's answer format."""
    question = tasks.first_attempt_messages(task, example)[-1]["content"]
    feedback = verdict.message or "the answer is not correct"
    if verdict.error:
        feedback = f"{verdict.error.replace('_', ' ')}: {feedback}"
    request = (f"Here is a task.\n\n{question}\n\nThis answer to it failed:\n\n{failed}\n\n"
               f"The checker's feedback: {feedback}\n\nWrite a corrected answer that fixes this problem. "
               f"{tasks.FORMAT[task]}")
    return [{"role": "system", "content": f"{tasks.SYSTEM[task]} You repair answers that failed a checker."},
            {"role": "user", "content": request}]


@contextmanager
def reflector_adapter(model):
    """Switch to a fresh reflector LoRA (the agent's config, zero-initialised: the base model) for the
    block; yield its trainable parameters; switch back to the agent's adapter and delete it afterwards."""
    agent = model.active_adapter
    model.add_adapter(REFLECTOR, copy.deepcopy(model.peft_config[agent]))
    model.set_adapter(REFLECTOR)  # also makes only the reflector's weights trainable
    params = [p for p in model.parameters() if p.requires_grad]
    rl.broadcast_params(params)  # peft drew LoRA-A per rank: the ranks must start from one reflector
    try:
        yield params
    finally:
        model.set_adapter(agent)
        model.delete_adapter(REFLECTOR)


def save_adapter(model, name: str, path):
    """One named adapter in standard peft form (adapter_config.json + adapter_model.safetensors) in path."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    model.peft_config[name].save_pretrained(path)
    save_file(get_peft_model_state_dict(model, adapter_name=name), path / "adapter_model.safetensors")


def reflect(model, tok, args, examples: list[dict], failures: list[tuple[int, Turn]], seeds: list[int]):
    """One corrected output per failed agent turn (seeds: one per failure), verified:
    [(example index, reflector Turn)]."""
    convs = [reflector_messages(args.task, examples[i], t.text, t.verdict) for i, t in failures]
    with rollout.progress(f"rerest: reflector corrects {len(convs)} failures"):
        turns = rollout.sample_turns(model, tok, convs, Gen(args.max_new_tokens, args.temperature, seed=seeds))
    rollout.judge(args.task, turns, [examples[i] for i, _ in failures])
    return [(i, c) for (i, _), c in zip(failures, turns)]


# ---------------------------------------------------------------------------------------------- the data

def _keep_once():
    """A filter that is true the first time it sees (input index, output text), stripped."""
    seen = set()

    def new(i: int, text: str) -> bool:
        key = (i, text.strip())
        if key in seen:
            return False
        seen.add(key)
        return True
    return new


def assemble(examples: list[dict], agent_turns: list[Turn], corrections: list[tuple[int, Turn]]):
    """Re-ReST's training data, (D_M, D_R), as Turns whose prompt is the example's first-attempt prompt.

    agent_turns: k per example, prompt-major (rollout.attempt with n=k), verified.
    corrections: (example index, reflector Turn) pairs, verified.
    D_M: the passing agent outputs. D_R: the passing corrections, moved onto the agent's prompt (the agent
    learns to answer the task, not to correct). Failing corrections are dropped; an output identical to
    one already kept for the same input (D_M first) is dropped too.
    """
    k = len(agent_turns) // max(len(examples), 1)
    new = _keep_once()
    d_m = [t for j, t in enumerate(agent_turns) if t.verdict.correct and new(j // k, t.text)]
    d_r = []
    for i, c in corrections:
        if c.verdict.correct and new(i, c.text):
            prompt = agent_turns[i * k]
            d_r.append(Turn(prompt.messages, prompt.prompt_ids, c.ids, c.text, c.verdict))
    return d_m, d_r


def reflector_data(corrections: list[tuple[int, Turn]]) -> list[Turn]:
    """The reflector's own training pairs: its passing corrections (reflector prompt -> correction), once each."""
    new = _keep_once()
    return [c for i, c in corrections if c.verdict.correct and new(i, c.text)]


# ---------------------------------------------------------------------------------------------- training

def epoch_batches(n_items: int, batch_size: int, seed: int, rank: int, size: int) -> list[list[int]]:
    """One epoch's batches of item indices for this rank: a seeded order, the same on every rank (the seed
    must not depend on the rank), cut into global batches, each split over the ranks. Across ranks, an
    epoch covers every item exactly once."""
    order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[start:start + batch_size][rank::size] for start in range(0, n_items, batch_size)]


def sft(model, tok, optimizer, args, data: list[Turn], phase: str, step: int, seed: int, log) -> int:
    """--sft-epochs epochs of supervised updates on data (prompt -> output, the same list on every rank):
    batches of --batch-size items (epoch_batches). Logs each epoch's mean loss; returns the optimizer step
    count (the agent's is the run's "step"; the reflector's "reflector_step")."""
    rank, size = rl.world()
    if not data:
        return step
    samples = [rl.Sample(t.prompt_ids, t.ids, 0.0) for t in data]  # the advantage is not used by SFT
    bs = args.batch_size
    bar = cli.bar(total=args.sft_epochs * math.ceil(len(samples) / bs), desc=f"rerest {phase} sft")
    for epoch in range(args.sft_epochs):
        losses = []
        for batch in epoch_batches(len(samples), bs, seed + epoch, rank, size):
            mine = [samples[i] for i in batch]
            stats = rl.supervised_update(model, optimizer, mine, tok.pad_token_id, args.micro_batch,
                                         micro_batch_tokens=args.micro_batch_tokens)
            losses.append(sum(rl.gather([stats["loss"]])))  # the ranks' parts of one batch loss
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        log(phase=f"{phase}_sft", **{"step" if phase == "agent" else "reflector_step": step}, epoch=epoch + 1,
            loss=sum(losses) / len(losses), items=len(samples))
    bar.close()
    return step


def train(model, tok, optimizer, args, state: dict, train: list[dict], test: list[dict]):
    """One round of Re-ReST (see the module docstring); the agent's adapter is the model's active one."""
    if args.k < 1 or args.batch_size < 1 or args.sft_epochs < 0:
        raise cli.UsageError("Re-ReST needs --k >= 1, --batch-size >= 1 and --sft-epochs >= 0")
    if not train:
        raise cli.UsageError("no training examples (--train-size 0?)")
    rank, size = rl.world()
    round_ = state.get("round", 0) + 1
    seed = mix_seed(args.seed, round_)  # the same on every rank; rows get their own seeds from it below
    step = state["step"]

    def log(**record):
        record = {"step": step, "kind": "rerest", "round": round_, **record}
        if rank == 0:
            loop.log_line(args, record)
            if not record["phase"].endswith("_sft") or not cli.on_terminal():  # at a terminal, sft has its bar
                print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    # 1. The agent samples k outputs per input; D_M is made of the passing ones.
    where = loop.my_share(list(range(len(train))), rank, size)  # global index of each of this rank's inputs
    mine = [train[g] for g in where]
    model.train()
    with rollout.progress(f"rerest: agent samples ({args.k} per input)"):
        agent_turns = rollout.attempt(model, tok, args.task, mine, Gen(args.max_new_tokens, args.temperature,
                                      seed=[mix_seed(seed, g) for g in where]), n=args.k)
    failed = [j for j, t in enumerate(agent_turns) if not t.verdict.correct]
    failures = [(j // args.k, agent_turns[j]) for j in failed]
    # one seed per failure and reflector pass, from the input's global index and the sample's number
    failure_seeds = lambda tag: [mix_seed(seed, tag, where[j // args.k], j % args.k) for j in failed]  # noqa: E731
    n_failures = sum(rl.gather([len(failures)]))
    passed = rl.gather([t.verdict.correct for t in agent_turns])
    log(phase="sample", inputs=len(train), outputs=len(passed), agent_pass=sum(passed) / max(len(passed), 1))

    # 2-3. The reflector corrects the failures, learns from its passing corrections, and corrects again.
    with reflector_adapter(model) as reflector_params:
        corrections = reflect(model, tok, args, mine, failures, failure_seeds(1))
        pairs = rl.gather(reflector_data(corrections))
        log(phase="reflect", reflector="base", failures=n_failures, corrected=len(pairs))
        if pairs and args.sft_epochs:
            reflector_opt = torch.optim.AdamW(reflector_params, lr=args.lr, weight_decay=0.0)
            sft(model, tok, reflector_opt, args, pairs, "reflector", 0, seed + 2, log)
            more = reflect(model, tok, args, mine, failures, failure_seeds(3))
            log(phase="reflect", reflector="trained", failures=n_failures,
                corrected=len(rl.gather(reflector_data(more))))
            corrections += more
            if rank == 0:
                save_adapter(model, REFLECTOR, args.out_dir / REFLECTOR)

    # 4. The agent learns D_M + D_R by supervised fine-tuning.
    d_m, d_r = (rl.gather(d) for d in assemble(mine, agent_turns, corrections))
    log(phase="data", d_m=len(d_m), d_r=len(d_r))
    if not d_m + d_r and rank == 0:
        print("Re-ReST: no passing output and no passing correction: nothing to fine-tune the agent on")
    step = sft(model, tok, optimizer, args, d_m + d_r, "agent", step, seed + 4, log)

    # 5. The agent alone, on the held-out split; its adapter in a checkpoint.
    if args.eval_every:
        log(phase="eval", **loop.evaluate(model, tok, args, test, rank, size))
    if rank == 0:
        rundir.save_checkpoint(args.out_dir, model, optimizer, {"step": step, "round": round_, "d_m": len(d_m),
                                                                "d_r": len(d_r)})
