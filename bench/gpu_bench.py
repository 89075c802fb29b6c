"""GPU benchmark on a model of Qwen2.5-1.5B's shape with random weights (no network, no checkpoint):
sample.generate vs HF generate tokens/s, and the R3 step's time and peak GPU memory in bf16, in bf16
with --grad-checkpointing, and in 4-bit (bitsandbytes NF4) + LoRA r=16, group size 8 (docs/gpu.md).

    python bench/gpu_bench.py [--model-config qwen2.5-1.5b] [--tokenizer DIR] [--steps 2]
    python bench/gpu_bench.py --dry-run     # CPU, a 2-layer model, tiny lengths: proves the script runs

Without a CUDA device (and without --dry-run) it prints "no CUDA device" and exits 0.

The model: bench/<config>.json built with random weights (bench/random_model.py) on the GPU in bf16,
saved to a temporary directory, and loaded from there by model.load_model, in bf16 or with
load_in_4bit=True (bitsandbytes quantizes the random weights on load). Token ids come from the
embedded SmolLM2 tokenizer (all < 49152, valid ids of the 151936-word vocabulary): ids are just ids,
and a random model's text is noise, so the R3 step uses --rewards random (r3_step_bench.py): every
group trains. Each R3 configuration runs in its own process (bench/r3_step_bench.py --json), so its
peak memory is its own.

On the lent GPU machines (no network; no bitsandbytes, no gguf there): carry the tokenizer and a
bitsandbytes wheel. Here, once, in the repo root:
    echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu/tok .gpu/whl
    cp ~/.cache/r3/SmolLM2-135M-Instruct/{tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpu/tok/
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_24_x86_64 -d .gpu/whl bitsandbytes==0.50.2
then run with carry [".gpu"]:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl; export PYTHONPATH=/tmp/site
    PYTHONUNBUFFERED=1 python3 bench/gpu_bench.py --tokenizer .gpu/tok
(without bitsandbytes the 4-bit row says so and the rest still runs).
"""
import argparse
import gc
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sampling_rows(model_dir, device, a) -> list[tuple]:
    """(prompt tokens, ours tok/s, HF tok/s, speed-up) per prompt length, as bench/sample_bench.py measures."""
    import torch

    import sample_bench
    from model import load_model
    model, tok = load_model(str(model_dir), device=device)
    model.eval()
    rows = []
    for length in a.lengths:
        prompts = sample_bench.make_prompts(tok, a.prompts, length)
        sample_bench.time_ours(model, prompts, a.group_size, 4)  # warm-up both paths
        sample_bench.time_hf(model, tok, prompts, a.group_size, 4)
        ours = statistics.median(sync(sample_bench.time_ours, model, prompts, a.group_size, a.new)
                                 for _ in range(a.repeats))
        hf = statistics.median(sync(sample_bench.time_hf, model, tok, prompts, a.group_size, a.new)
                               for _ in range(a.repeats))
        tokens = a.prompts * a.group_size * a.new
        rows.append((length, tokens / ours, tokens / hf, hf / ours))
        print(f"  sampling, prompt {length}: ours {ours:.2f}s, HF generate {hf:.2f}s", flush=True)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def sync(fn, *args):
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return dt


def r3_step(model_dir, four_bit: bool, a, extra=()) -> dict:
    """bench/r3_step_bench.py in its own process (extra: more train_r3.py flags); its JSON result."""
    cmd = [sys.executable, os.path.join(HERE, "r3_step_bench.py"), "--json", "--steps", str(a.steps),
           "--warmup", str(a.warmup), "--rewards", "random", "--reuse", "on"] + (["--4bit"] if four_bit else []) + \
          ["--", "--model", str(model_dir), "--group-size", str(a.group_size), *extra, *a.train_args]
    print("  $ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"the R3 step bench failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model and lengths: check the script end to end")
    p.add_argument("--model-config", default="qwen2.5-1.5b", help="bench/<name>.json (or tiny)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the embedded SmolLM2's)")
    p.add_argument("--prompts", type=int, default=2, help="sampling: prompts per batch")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--new", type=int, default=128, help="sampling: new tokens per sample (fixed length)")
    p.add_argument("--lengths", type=int, nargs="+", default=[100, 500], help="sampling: prompt lengths")
    p.add_argument("--repeats", type=int, default=3, help="sampling: timed runs per side (median)")
    p.add_argument("--steps", type=int, default=2, help="R3: timed steps (median)")
    p.add_argument("--warmup", type=int, default=1, help="R3: untimed steps first")
    p.add_argument("--skip-4bit", action="store_true")
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[], help="R3: more train_r3.py flags (last)")
    a = p.parse_args(argv)

    import torch
    if a.dry_run:
        device = "cpu"
        a.model_config, a.lengths, a.new, a.repeats, a.prompts = "tiny", [16], 4, 1, 1
        a.steps, a.warmup, a.group_size = 1, 0, 2
        a.train_args = ["--train-size", "2", "--batch-size", "1", "--reflect-tokens", "4", "--max-new-tokens", "4",
                        *a.train_args]
    elif not torch.cuda.is_available():
        print("no CUDA device")
        return 0
    else:
        device = "cuda"
    t0 = time.perf_counter()
    import random_model
    work = tempfile.mkdtemp(prefix="gpu-bench-")
    model_dir = random_model.build(a.model_config, os.path.join(work, "model"), a.tokenizer, device=device)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    print(f"{gpu}: random {a.model_config} model in {model_dir} ({time.perf_counter() - t0:.0f}s)", flush=True)

    try:
        samples = sampling_rows(model_dir, device, a)
        r3 = {"bf16": r3_step(model_dir, False, a),
              "bf16 + --grad-checkpointing": r3_step(model_dir, False, a, ["--grad-checkpointing"])}
        if a.skip_4bit or device != "cuda":
            r3["4-bit + LoRA"] = "skipped (needs CUDA)" if device != "cuda" else "skipped (--skip-4bit)"
        elif importlib.util.find_spec("bitsandbytes") is None:
            r3["4-bit + LoRA"] = "skipped: bitsandbytes is not installed (see this script's docstring)"
        else:
            r3["4-bit + LoRA"] = r3_step(model_dir, True, a)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{gpu}, torch {torch.__version__}, model {a.model_config} (random weights, bf16), "
          f"wall {time.perf_counter() - t0:.0f}s\n")
    print(f"| prompt tokens | groups x n | new tokens | sample.generate tok/s | HF generate tok/s | speed-up |")
    print("|---|---|---|---|---|---|")
    for length, ours, hf, ratio in samples:
        print(f"| {length} | {a.prompts} x {a.group_size} | {a.new} | {ours:.1f} | {hf:.1f} | {ratio:.2f}x |")
    print("\n| R3 step | step s | reflections s (tok/s) | retries s (tok/s) | update s (tok/s) | other s "
          "| peak GPU GiB | first attempts tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, res in r3.items():
        if isinstance(res, str):
            print(f"| {name} | {res} | | | | | | |")
            continue
        ph = res["phases"]
        cell = lambda k: f"{ph[k]['s']:.2f} ({ph[k]['tok_s'] or 0:.0f})"  # noqa: E731
        peak = f"{res['peak_gb']:.2f}" if res["peak_gb"] is not None else "-"
        print(f"| {name} | {res['step_s']:.2f} | {cell('reflections')} | {cell('retries')} | {cell('update')} "
              f"| {ph['other']['s']:.2f} | {peak} | {ph['first attempts']['tok_s'] or 0:.0f} |")
    c = next((r["config"] for r in r3.values() if not isinstance(r, str)), {})
    print(f"\nR3: {c.get('batch_size')} queries x {c.get('group_size')} reflections (<= {c.get('reflect_tokens')} "
          f"tokens) + retries (<= {c.get('max_new_tokens')}), LoRA r={c.get('lora_r')}, micro-batch "
          f"{c.get('micro_batch')}; median of {a.steps} steps after {a.warmup} warm-up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
