"""Tokens/s of sample.generate vs HF model.generate, in one run, on two workloads.

    python bench/sample_bench.py [--model smollm2-135m] [--prompts 2] [--n 8] [--new 128] [--repeats 2]
                                 [--workload both|group|fewshot]

group: each prompt gets a group of n samples (temperature 1, fixed length: stop tokens ignored, so
both sides produce exactly the same number of tokens). Prompts of about 100 and about 500 tokens.

fewshot: the real workload of a first-attempt rollout: 16 Countdown prompts (the chat template, the
system prompt and three solved examples, then the question; ~313 tokens, ~280 of them common to all)
x n = 4 samples, at most 48 new tokens, temperature 1, stop tokens honoured on both sides (each side
stops where its samples do, so the tokens per second of the two are compared, not the seconds).
Prints "few-shot workload speed-up vs HF generate: X.XX×".
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import DEFAULT_MODEL, load_model, stop_token_ids  # noqa: E402
from sample import generate  # noqa: E402

FILLER = ("The quick brown fox jumps over the lazy dog while the farmer counts his sheep, "
          "and the river runs on past the old mill toward the sea. ")


def make_prompts(tok, count, length):
    """`count` different prompts of exactly `length` tokens."""
    prompts = []
    for i in range(count):
        ids = tok(f"Story {i}: " + FILLER * (length // 10 + 2))["input_ids"][:length]
        prompts.append(ids)
    return prompts


def time_ours(model, prompts, n, new):
    t = time.perf_counter()
    outs = generate(model, prompts, n=n, max_new_tokens=new, temperature=1.0, seed=0, ignore_stop=True)
    dt = time.perf_counter() - t
    assert sum(map(len, outs)) == len(prompts) * n * new
    return dt


def hf_sample(model, tok, prompts, n, new, **kw):
    """HF generate, n samples of each prompt at temperature 1: (the new tokens [rows, <= new], seconds)."""
    batch = tok.pad({"input_ids": prompts}, return_tensors="pt").to(model.device)
    t = time.perf_counter()
    out = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=n,
                         max_new_tokens=new, pad_token_id=tok.pad_token_id, **kw)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return out[:, batch["input_ids"].shape[1]:], time.perf_counter() - t


def time_hf(model, tok, prompts, n, new):
    out, dt = hf_sample(model, tok, prompts, n, new, min_new_tokens=new)
    assert out.shape == (len(prompts) * n, new)
    return dt


def fewshot_prompts(tok, count):
    import rollout
    import tasks
    return [rollout.chat_ids(tok, tasks.first_attempt_messages("countdown", ex))
            for ex in tasks.load_examples("countdown", "train", n=count)]


def fewshot(model, tok, prompts, n, new):
    """(ours tok/s, HF tok/s, ours s, HF s, ours tokens, HF tokens): both sample with stops honoured."""
    stops = stop_token_ids(tok)
    t = time.perf_counter()
    outs = generate(model, prompts, n=n, max_new_tokens=new, temperature=1.0, seed=0, stop_token_ids=stops,
                    pad_token_id=tok.pad_token_id)
    ours_s, ours_tokens = time.perf_counter() - t, sum(map(len, outs))
    out, hf_s = hf_sample(model, tok, prompts, n, new, eos_token_id=stops)
    # HF's tokens: each row up to and including its first stop token (it pads after that)
    hf_tokens = sum(next((i + 1 for i, x in enumerate(row) if x in stops), len(row)) for row in out.tolist())
    return ours_tokens / ours_s, hf_tokens / hf_s, ours_s, hf_s, ours_tokens, hf_tokens


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--random-weights", default=None,
                   help="build random weights from this config dir/Hub config instead of loading (GPU shape tests)")
    p.add_argument("--prompts", type=int, default=2, help="prompts per batch")
    p.add_argument("--n", type=int, default=8, help="samples per prompt (group size)")
    p.add_argument("--new", type=int, default=128, help="new tokens per sample")
    p.add_argument("--lengths", type=int, nargs="+", default=[100, 500])
    p.add_argument("--repeats", type=int, default=2, help="group: timed runs per side (median reported)")
    p.add_argument("--workload", default="both", choices=["both", "group", "fewshot"])
    p.add_argument("--fewshot-prompts", type=int, default=16)
    p.add_argument("--fewshot-n", type=int, default=4)
    p.add_argument("--fewshot-new", type=int, default=48)
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    model.eval()
    dev = next(model.parameters()).device
    print(f"model={args.model} device={dev} dtype={next(model.parameters()).dtype} threads={torch.get_num_threads()}")
    rows = []
    for length in args.lengths if args.workload in ("both", "group") else []:
        prompts = make_prompts(tok, args.prompts, length)
        time_ours(model, prompts, args.n, 8)  # warm-up both paths
        time_hf(model, tok, prompts, args.n, 8)
        ours = statistics.median(time_ours(model, prompts, args.n, args.new) for _ in range(args.repeats))
        hf = statistics.median(time_hf(model, tok, prompts, args.n, args.new) for _ in range(args.repeats))
        tokens = args.prompts * args.n * args.new
        rows.append((length, tokens / ours, tokens / hf, hf / ours))
        print(f"  prompt {length}: ours {ours:.2f}s  hf {hf:.2f}s", flush=True)
    if rows:
        print(f"\n| prompt tokens | groups x n | new tokens | sample.generate tok/s | HF generate tok/s | speed-up |")
        print("|---|---|---|---|---|---|")
        for length, ours, hf, ratio in rows:
            print(f"| {length} | {args.prompts} x {args.n} | {args.new} | {ours:.1f} | {hf:.1f} | {ratio:.2f}x |")
    if args.workload in ("both", "fewshot"):
        prompts = fewshot_prompts(tok, args.fewshot_prompts)
        common = len(os.path.commonprefix(prompts))
        fewshot(model, tok, prompts[:2], 2, 4)  # warm-up both paths
        ours, hf, ours_s, hf_s, ours_n, hf_n = fewshot(model, tok, prompts, args.fewshot_n, args.fewshot_new)
        print(f"\nfew-shot workload: {len(prompts)} Countdown prompts ({min(map(len, prompts))}-{max(map(len, prompts))} "
              f"tokens, {common} in common) x n = {args.fewshot_n}, <= {args.fewshot_new} new tokens, stops honoured\n")
        print("| | seconds | tokens generated | tokens/s |")
        print("|---|---|---|---|")
        print(f"| sample.generate | {ours_s:.2f} | {ours_n} | {ours:.1f} |")
        print(f"| HF generate | {hf_s:.2f} | {hf_n} | {hf:.1f} |")
        print(f"\nfew-shot workload speed-up vs HF generate: {ours / hf:.2f}×", flush=True)


if __name__ == "__main__":
    main()
