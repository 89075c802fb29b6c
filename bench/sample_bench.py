"""Tokens/s of sample.generate: against the sampler as it was before (decode), and against HF
model.generate (group, fewshot).

    python bench/sample_bench.py                      # decode: before vs now, batch 16 and 64, matmul limit
    python bench/sample_bench.py --workload fewshot   # vs HF generate (also: group, all)

decode: the embedded model with a LoRA (r 16, all linear layers, random non-zero B as after training),
Countdown first-attempt prompts (~316 tokens) x n = 4, temperature 1, seeded, 32 new tokens (stops
ignored). "before" is sample.py as of --before (a git revision; its generate); "now" is this tree's, on
the same model. Decode time = the 33-token run less the 1-token run (the prefill). The matmul limit:
the matmuls decode.decode_step does (LoRA merged, q/k/v and gate/up fused, and the output head) run
back to back at the same row count, nothing else, MKL-packed (as decode_step runs them up to
decode.PACK_MAX_ROWS rows) and plain x @ W.T in brackets; "weights read once": a sum over each of
those weights, the memory floor of any fp32 decode step at any batch size.
Prints "decode speed-up vs before: X.XX×" (batch 16).

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

BEFORE = "211ccf6"  # main before the decode rewrite of issue 20

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
    stops = stop_token_ids(tok, model.generation_config)
    t = time.perf_counter()
    outs = generate(model, prompts, n=n, max_new_tokens=new, temperature=1.0, seed=0, stop_token_ids=stops,
                    pad_token_id=tok.pad_token_id)
    ours_s, ours_tokens = time.perf_counter() - t, sum(map(len, outs))
    out, hf_s = hf_sample(model, tok, prompts, n, new, eos_token_id=stops)
    # HF's tokens: each row up to and including its first stop token (it pads after that)
    hf_tokens = sum(next((i + 1 for i, x in enumerate(row) if x in stops), len(row)) for row in out.tolist())
    return ours_tokens / ours_s, hf_tokens / hf_s, ours_s, hf_s, ours_tokens, hf_tokens


def sampler_before(rev: str):
    """sample.py as of git revision rev, imported as its own module."""
    import importlib.util
    import subprocess
    import tempfile
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = subprocess.run(["git", "-C", root, "show", f"{rev}:sample.py"], capture_output=True, text=True)
    if text.returncode:
        raise SystemExit(f"--before {rev}: git show failed (a clone with its history is needed): {text.stderr.strip()}")
    path = os.path.join(tempfile.mkdtemp(prefix="sampler-before-"), "sample_before.py")
    with open(path, "w") as f:
        f.write(text.stdout)
    spec = importlib.util.spec_from_file_location("sample_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lora_model():
    """The embedded model with LoRA r 16 on all linear layers, A and B random (seeded; B non-zero as a
    trained adapter's)."""
    model, tok = load_model(DEFAULT_MODEL, lora_r=16)
    model.eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.01 if "lora_B" in name else 0.04))
    return model, tok


def decode_time(sampler, model, tok, prompts, n, new=32, repeats=2):
    """(seconds per decode step, outputs): the median over repeats of the (new + 1)-token run less the
    1-token run, both sampled with the same seed, divided by new."""
    def run(k):
        t = time.perf_counter()
        outs = sampler.generate(model, prompts, n=n, max_new_tokens=k, temperature=1.0, seed=0, ignore_stop=True,
                                pad_token_id=tok.pad_token_id)
        return time.perf_counter() - t, outs
    run(2)
    times = []
    for _ in range(repeats):
        t1, _ = run(1)
        t, outs = run(new + 1)
        times.append((t - t1) / new)
    return statistics.median(times), outs


def matmul_limit(model, rows: int, repeats: int = 3) -> dict:
    """Seconds for one pass of the matmuls a decode step cannot skip, at `rows` rows, run back to back on
    inputs made beforehand: the weights decode.decode_step multiplies (LoRA merged, q/k/v and gate/up
    fused, the output head), "packed" as decode_step runs them on this machine and "plain" (x @ W.T on
    the weights as stored); and "read": reading each weight once (a sum), the memory floor of any
    decode step that keeps them in fp32."""
    import decode
    out = {}
    with torch.inference_mode():
        for label, pack in (("plain", False), ("packed", decode.PACK_WEIGHTS)):
            was = decode.PACK_WEIGHTS, decode.PACK_MAX_ROWS
            decode.PACK_WEIGHTS, decode.PACK_MAX_ROWS = pack, rows
            dec = decode.decoder(model, rows)
            decode.PACK_WEIGHTS, decode.PACK_MAX_ROWS = was
            mats = [m for layer in dec.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)] + [dec.head]
            inputs = {m.weight.shape[1]: torch.randn(rows, m.weight.shape[1]) for m in mats}
            for _ in range(repeats + 1):  # the first pass warms up
                t = time.perf_counter()
                for m in mats:
                    m(inputs[m.weight.shape[1]])
                out[label] = time.perf_counter() - t
            if label == "plain":
                weights = [m.weight for m in mats]
                for _ in range(repeats + 1):
                    t = time.perf_counter()
                    for w in weights:
                        w.sum()
                    out["read"] = time.perf_counter() - t
                out["bytes"] = sum(w.numel() * w.element_size() for w in weights)
            del dec, mats
    return out


def decode_workload(args):
    import rollout
    import tasks
    before = sampler_before(args.before)
    import sample
    rows = {}
    for label, sampler in (("before", before), ("now", sample)):
        model, tok = lora_model()
        exs = tasks.load_examples("countdown", "train", n=16)
        prompts = [rollout.chat_ids(tok, tasks.first_attempt_messages("countdown", ex)) for ex in exs]
        for batch in args.decode_batches:
            step_s, outs = decode_time(sampler, model, tok, prompts[:batch // 4], 4, repeats=args.repeats)
            limit_s = matmul_limit(model, batch) if label == "now" else None
            rows[label, batch] = (step_s, outs, limit_s)
            print(f"  {label} batch {batch}: {1000 * step_s:.1f} ms/step", flush=True)
        del model
    print(f"\ndecode, embedded model + LoRA r 16, Countdown prompts x n = 4, 32 new tokens, temperature 1, "
          f"threads={torch.get_num_threads()}; before = sample.py at {args.before}\n")
    print("| batch | before tok/s | now tok/s | speed-up | now ms/step | matmul limit ms/step, packed (plain) "
          "| limit / now | weights read once ms | same tokens as before |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch in args.decode_batches:
        (b_s, b_out, _), (n_s, n_out, lim) = rows["before", batch], rows["now", batch]
        same = sum(x == y for x, y in zip(b_out, n_out))
        print(f"| {batch} | {batch / b_s:.1f} | {batch / n_s:.1f} | {b_s / n_s:.2f}× | {1000 * n_s:.1f} | "
              f"{1000 * lim['packed']:.1f} ({1000 * lim['plain']:.1f}) | {100 * lim['packed'] / n_s:.0f}% | "
              f"{1000 * lim['read']:.1f} ({lim['bytes'] / 2**20:.0f} MiB, {lim['bytes'] / lim['read'] / 1e9:.1f} "
              f"GB/s) | {same}/{len(n_out)} |")
    first = args.decode_batches[0]
    print(f"\ndecode speed-up vs before: {rows['before', first][0] / rows['now', first][0]:.2f}× (batch {first})",
          flush=True)


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
    p.add_argument("--workload", default="decode", choices=["decode", "group", "fewshot", "both", "all"],
                   help="both: group and fewshot; all: the three")
    p.add_argument("--before", default=BEFORE, help="decode: the git revision whose sample.py is 'before'")
    p.add_argument("--decode-batches", type=int, nargs="+", default=[16, 64], help="decode: rows (multiples of 4)")
    p.add_argument("--fewshot-prompts", type=int, default=16)
    p.add_argument("--fewshot-n", type=int, default=4)
    p.add_argument("--fewshot-new", type=int, default=48)
    args = p.parse_args()
    torch.manual_seed(0)
    if args.workload in ("decode", "all"):
        decode_workload(args)
        if args.workload == "decode":
            return
    model, tok = load_model(args.model)
    model.eval()
    dev = next(model.parameters()).device
    print(f"model={args.model} device={dev} dtype={next(model.parameters()).dtype} threads={torch.get_num_threads()}")
    rows = []
    for length in args.lengths if args.workload in ("both", "group", "all") else []:
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
    if args.workload in ("both", "fewshot", "all"):
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
