"""One plain GRPO step, ours (train_r3.train_step) vs TRL's GRPOTrainer, on the same model and batch.

    python bench/grpo_vs_trl.py [--model smollm2-135m] [--prompts 2] [--group-size 8] [--max-new-tokens 64]
                                [--max-steps 3] [--warmup 1] [--loss grpo] [--micro-batch 16]

Both sides: the model with a fresh LoRA (r=16, alpha 32, all linear layers), fp32 on CPU, the same
countdown first-attempt prompts in the same order (prompts x group-size completions per step),
temperature 1, fixed-length generation (ours: sample.generate(ignore_stop=True); TRL: min_new_tokens =
max_completion_length), the same loss (loss_type grpo, beta 0.001 with the adapter-disabled model as
the reference, eps 0.2, no KL ratio weighting), AdamW at lr 1e-4, gradient clipping at 1.0, and one
optimizer step per sampled batch. TRL keeps its own defaults otherwise: gradient checkpointing on
(--trl-checkpointing off to compare without), its fused chunked log-prob LM head. Rewards are seeded
random numbers on both sides, so every group carries signal and both update on every completion
(the verifier's cost is not what is measured).

Each side runs in its own process (so peak RSS, VmHWM, is its own): a warm-up step, then --max-steps
timed steps; medians are reported. The last column is TRL / ours for times and memory, ours / TRL
for tokens/s: above 1 means ours is better. "sampling" = tokenize + generate + decode + reward;
"update" = the rest of the step: reference and policy log-probs, loss, backward, optimizer step (and,
for TRL, its trainer loop around them).
"""
import argparse
import functools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def examples_for(n: int) -> list[dict]:
    import tasks
    return tasks.load_examples("countdown", "train", n=n, seed=0)


def run_ours(a) -> dict:
    import torch

    import rl
    import rollout
    import sample
    import loop
    import train_r3
    from model import load_model
    torch.manual_seed(0)
    model, tok = load_model(a.model, lora_r=a.lora_r, device="cpu")
    base_kb = proc_status_kb("VmRSS")
    agg = {"grpo": "grpo", "dapo": "token"}[a.loss]
    args = train_r3.parse_args(["--method", "grpo", "--task", "countdown", "--group-size", str(a.group_size),
                                "--batch-size", str(a.prompts), "--micro-batch", str(a.micro_batch),
                                "--max-new-tokens", str(a.max_new_tokens), "--kl-beta", str(a.kl_beta),
                                "--loss-agg", agg, "--lr", "1e-4", "--out-dir", tempfile.mkdtemp()])
    # The two bench settings, patched in here rather than added to the trainer: fixed-length sampling,
    # and seeded random rewards (every group has signal, so every completion is trained on, as in TRL).
    rollout.generate = functools.partial(sample.generate, ignore_stop=True)
    rng = random.Random(0)
    loop.reward = lambda verdict, kind="binary": rng.random()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    cfg = rl.UpdateConfig(args.kl_beta, args.clip_eps, args.updates_per_batch, args.micro_batch, agg=args.loss_agg,
                          temperature=args.temperature)
    model.train()
    examples = examples_for(a.prompts * (a.warmup + a.max_steps))
    steps = []
    for k in range(a.warmup + a.max_steps):
        queries = [{"example": ex} for ex in examples[k * a.prompts:(k + 1) * a.prompts]]
        s = train_r3.train_step(model, tok, optimizer, args, cfg, queries, seeds=[1000 * k + i for i in range(len(queries))],
                                method="grpo", reward_kind=args.reward)
        assert all(s["signal"]) and s["tokens"][0] == a.prompts * a.group_size * a.max_new_tokens, s
        steps.append({"sample": s["sample_s"][0], "step": s["step_s"][0]})
    prompt_len = [len(rollout.chat_ids(tok, tasks_messages(ex))) for ex in examples[:a.prompts]]
    return {"steps": steps, "base_kb": base_kb, "peak_kb": proc_status_kb("VmHWM"), "prompt_len": prompt_len}


def tasks_messages(ex):
    import tasks
    return tasks.first_attempt_messages("countdown", ex)


def run_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from model import load_model
    torch.manual_seed(0)
    model, tok = load_model(a.model, device="cpu")  # TRL adds the LoRA (peft_config): reference = adapter off
    base_kb = proc_status_kb("VmRSS")
    n_steps = a.warmup + a.max_steps
    examples = examples_for(a.prompts * n_steps)
    rng = random.Random(0)
    lengths, prompt_len = [], []

    def reward(completions, completion_ids, **kwargs):
        lengths.extend(len(c) for c in completion_ids)
        return [rng.random() for _ in completions]

    per_step = a.prompts * a.group_size
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.micro_batch,
        gradient_accumulation_steps=per_step // a.micro_batch, num_generations=a.group_size,
        max_completion_length=a.max_new_tokens, generation_kwargs={"min_new_tokens": a.max_new_tokens},
        temperature=1.0, beta=a.kl_beta, epsilon=0.2, loss_type=a.loss, use_bias_correction_kl=False,
        learning_rate=1e-4, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, max_steps=n_steps,
        gradient_checkpointing=a.trl_checkpointing == "on",
        bf16=False, use_cpu=True, report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True,
        shuffle_dataset=False, seed=0, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, processing_class=tok,
                          train_dataset=Dataset.from_list([{"prompt": tasks_messages(ex)} for ex in examples]),
                          peft_config=LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    sampling = [0.0]

    def timed(fn, record_prompts=False):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            sampling[0] += time.perf_counter() - t
            if record_prompts and not prompt_len:
                prompt_len.extend(len(p) for p in out[0][::a.group_size])
            return out
        return wrapper

    trainer._generate = timed(trainer._generate, record_prompts=True)  # tokenize + generate + decode
    trainer._calculate_rewards = timed(trainer._calculate_rewards)
    steps = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            now = time.perf_counter()
            steps.append({"sample": sampling[0], "step": now - self.t})
            self.t, sampling[0] = now, 0.0

    trainer.add_callback(Clock())
    trainer.train()
    assert len(steps) == n_steps, steps
    assert lengths == [a.max_new_tokens] * (per_step * n_steps), "TRL did not generate fixed-length completions"
    return {"steps": steps, "base_kb": base_kb, "peak_kb": proc_status_kb("VmHWM"), "prompt_len": prompt_len}


def summarize(r: dict, a) -> dict:
    timed = r["steps"][a.warmup:]
    sample = statistics.median(s["sample"] for s in timed)
    step = statistics.median(s["step"] for s in timed)
    update = statistics.median(s["step"] - s["sample"] for s in timed)
    tokens = a.prompts * a.group_size * a.max_new_tokens
    return {"sample": sample, "update": update, "step": step, "tok_s": tokens / sample,
            "peak_mb": r["peak_kb"] / 1024, "delta_mb": (r["peak_kb"] - r["base_kb"]) / 1024,
            "prompt_len": r["prompt_len"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion length (fixed: stop tokens ignored)")
    p.add_argument("--max-steps", type=int, default=3, help="timed steps per side (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--loss", default="grpo", choices=["grpo", "dapo"], help="TRL loss_type (ours: agg grpo / token)")
    p.add_argument("--kl-beta", type=float, default=0.001)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward, both sides")
    p.add_argument("--trl-checkpointing", default="on", choices=["on", "off"],
                   help="TRL's gradient checkpointing (its default: on; ours has none)")
    p.add_argument("--sides", nargs="+", default=["ours", "trl"], choices=["ours", "trl"])
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)  # internal: run one side, print JSON
    a = p.parse_args()
    if (a.prompts * a.group_size) % a.micro_batch:
        p.error("--micro-batch must divide prompts x group-size")
    if a.side:
        result = run_ours(a) if a.side == "ours" else run_trl(a)
        print("RESULT " + json.dumps(result), flush=True)
        return

    forward = [x for x in sys.argv[1:]]
    results = {}
    t0 = time.perf_counter()
    for side in a.sides:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *forward, "--side", side],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
            sys.exit(f"the {side} side failed (exit {proc.returncode})")
        results[side] = summarize(json.loads(lines[-1][7:]), a)
        r = results[side]
        print(f"  {side}: step {r['step']:.2f}s (sampling {r['sample']:.2f}s, update {r['update']:.2f}s), "
              f"peak RSS {r['peak_mb']:.0f} MB, prompts {r['prompt_len']} tokens", flush=True)
    import torch
    print(f"\nmodel={a.model} cpu threads={torch.get_num_threads()} batch={a.prompts} prompts x {a.group_size} "
          f"completions x {a.max_new_tokens} tokens, loss={a.loss}, lora r={a.lora_r}, micro-batch {a.micro_batch}, "
          f"TRL gradient checkpointing {a.trl_checkpointing}, "
          f"median of {a.max_steps} steps after {a.warmup} warm-up; bench wall {time.perf_counter() - t0:.0f}s\n")
    rows = [("sampling s/step", "sample", "{:.2f}", True), ("update s/step", "update", "{:.2f}", True),
            ("total s/step", "step", "{:.2f}", True), ("sampling tokens/s", "tok_s", "{:.0f}", False),
            ("peak RSS MB", "peak_mb", "{:.0f}", True), ("peak RSS over loaded model MB", "delta_mb", "{:.0f}", True)]
    sides = list(results)
    header = "| | " + " | ".join(sides) + (" | ours' advantage |" if len(sides) == 2 else " |")
    print(header)
    print("|---" * (len(sides) + 1 + (len(sides) == 2)) + "|")
    for label, key, fmt, lower_better in rows:
        cells = [fmt.format(results[s][key]) for s in sides]
        if len(sides) == 2:
            o, t = results["ours"][key], results["trl"][key]
            ratio = (t / o) if lower_better else (o / t)
            cells.append(f"{ratio:.2f}x")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
