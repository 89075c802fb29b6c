"""Tokens/s of sample.generate vs HF model.generate on the group workload, in one run.

    python bench/sample_bench.py [--model smollm2-135m] [--prompts 2] [--n 8] [--new 128] [--repeats 2]

Each prompt gets a group of n samples (temperature 1, fixed length: stop tokens ignored, so both
sides produce exactly the same number of tokens). Prompts of about 100 and about 500 tokens.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import DEFAULT_MODEL, load_model  # noqa: E402
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


def time_hf(model, tok, prompts, n, new):
    batch = tok.pad({"input_ids": prompts}, return_tensors="pt").to(model.device)
    t = time.perf_counter()
    out = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=n,
                         max_new_tokens=new, min_new_tokens=new, pad_token_id=tok.pad_token_id)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    assert out.shape == (len(prompts) * n, batch["input_ids"].shape[1] + new)
    return dt


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--random-weights", default=None,
                   help="build random weights from this config dir/Hub config instead of loading (GPU shape tests)")
    p.add_argument("--prompts", type=int, default=2, help="prompts per batch")
    p.add_argument("--n", type=int, default=8, help="samples per prompt (group size)")
    p.add_argument("--new", type=int, default=128, help="new tokens per sample")
    p.add_argument("--lengths", type=int, nargs="+", default=[100, 500])
    p.add_argument("--repeats", type=int, default=2, help="timed runs per side (median reported)")
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    model.eval()
    dev = next(model.parameters()).device
    print(f"model={args.model} device={dev} dtype={next(model.parameters()).dtype} threads={torch.get_num_threads()}")
    rows = []
    for length in args.lengths:
        prompts = make_prompts(tok, args.prompts, length)
        time_ours(model, prompts, args.n, 8)  # warm-up both paths
        time_hf(model, tok, prompts, args.n, 8)
        ours = statistics.median(time_ours(model, prompts, args.n, args.new) for _ in range(args.repeats))
        hf = statistics.median(time_hf(model, tok, prompts, args.n, args.new) for _ in range(args.repeats))
        tokens = args.prompts * args.n * args.new
        rows.append((length, tokens / ours, tokens / hf, hf / ours))
        print(f"  prompt {length}: ours {ours:.2f}s  hf {hf:.2f}s", flush=True)
    print(f"\n| prompt tokens | groups x n | new tokens | sample.generate tok/s | HF generate tok/s | speed-up |")
    print("|---|---|---|---|---|---|")
    for length, ours, hf, ratio in rows:
        print(f"| {length} | {args.prompts} x {args.n} | {args.new} | {ours:.1f} | {hf:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
