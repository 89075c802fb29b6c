"""Memory of the update on the CPU, at Qwen2.5-1.5B's layer shape and vocabulary (random weights,
bench/random_model.py): what --grad-checkpointing and the chunked log-probs (rl.token_logprobs) save.

    python bench/memory_bench.py                 # the update, 3 ways, and the log-probs alone, 2 ways
    python bench/memory_bench.py --layers 4 --rows 8 --completion 256

Each configuration runs in its own process. Two figures per line:
  - saved: bytes autograd keeps for backward (torch.autograd.graph.saved_tensors_hooks), weights aside:
    exact, and the same on a GPU for the same dtype;
  - peak: the process's resident memory at its highest during the call minus just before it (sampled
    every millisecond, glibc told to give large blocks back at once): what the call needed at its peak.
The model has --layers of Qwen2.5-1.5B's 28 decoder layers (so that a CPU runs it in seconds; the
decoder's share grows with the layer count, the log-probs' does not), in fp32 on the CPU, where a GPU
run is bf16: the decoder's activations there are about half these.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
MiB = 2 ** 20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn, weights=()) -> dict:
    """fn()'s seconds, saved-for-backward bytes (tensors sharing storage with `weights` aside) and peak
    resident growth."""
    import torch
    skip = {w.untyped_storage().data_ptr() for w in weights}
    saved, peak, done = [0], [0], threading.Event()

    def keep(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved[0] += t.numel() * t.element_size()
        return t

    def watch(base):
        while not done.is_set():
            peak[0] = max(peak[0], rss() - base)
            time.sleep(0.001)
    base = rss()
    watcher = threading.Thread(target=watch, args=(base,), daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        fn()
    seconds = time.perf_counter() - t0
    done.set()
    watcher.join()
    return {"s": seconds, "saved_mib": saved[0] / MiB, "peak_mib": max(peak[0], rss() - base) / MiB}


def plain_logprobs(logits, targets, temperature=1.0):
    """The log-probs before rl.token_logprobs: fp32 log_softmax over the vocabulary, then gather."""
    import torch
    logits = logits.float()
    if temperature and temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)


def run_update(a, how: str) -> dict:
    """One rl.update (reference pass, then forward and backward) on rows samples of a random model."""
    import torch

    import model as model_lib
    import rl
    m, tok = model_lib.load_model(a.model_dir, lora_r=16, device="cpu", dtype=torch.float32)
    m.train()
    if how == "checkpointing":
        model_lib.activation_checkpointing(m)
    if how == "plain":
        rl.token_logprobs = plain_logprobs
    g = torch.Generator().manual_seed(0)
    groups = max(a.rows // a.group_size, 1)
    prompts = [torch.randint(100, 40000, (a.prompt,), generator=g).tolist() for _ in range(groups)]
    samples = [rl.Sample(prompts[k // a.group_size % groups], torch.randint(100, 40000, (a.completion,),
                                                                             generator=g).tolist(), 1.0 - k % 2)
               for k in range(a.rows)]
    params = [p for p in m.parameters() if p.requires_grad]
    cfg = rl.UpdateConfig(micro_batch=a.rows)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    return measure(lambda: rl.update(m, optimizer, samples, cfg, tok.pad_token_id), list(m.parameters()))


def run_logprobs(a, how: str) -> dict:
    """Forward and backward of the log-probs alone, on bf16 logits [rows, completion, vocab]."""
    import torch

    import rl
    V = json.load(open(os.path.join(a.model_dir, "config.json")))["vocab_size"]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(a.rows, a.completion, V, generator=g).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V, (a.rows, a.completion), generator=g)
    fn = plain_logprobs if how == "plain" else rl.token_logprobs
    return measure(lambda: fn(logits, targets, 0.7).sum().backward())  # the logits kept count: a model's are
    # freed after the plain way's forward, kept by the chunked way


def child(a) -> None:
    what, how = a.child.split(":")
    result = (run_update if what == "update" else run_logprobs)(a, how)
    print("RESULT " + json.dumps(result))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the 1.5B shape (it has 28)")
    p.add_argument("--rows", type=int, default=4, help="completions in the micro-batch")
    p.add_argument("--group-size", type=int, default=4, help="completions per prompt")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--completion", type=int, default=128, help="completion tokens")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child(a)
    import torch

    import random_model
    work = tempfile.mkdtemp(prefix="memory-bench-")
    cfg = {**random_model.load_config_dict("qwen2.5-1.5b"), "num_hidden_layers": a.layers}
    path = os.path.join(work, "config.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    model_dir = str(random_model.build(path, os.path.join(work, "model")))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    rows = []
    for what, how in [("update", "plain"), ("update", "chunked"), ("update", "checkpointing"),
                      ("logprobs", "plain"), ("logprobs", "chunked")]:
        cmd = [sys.executable, __file__, "--child", f"{what}:{how}", "--model-dir", model_dir,
               *[x for k in ("layers", "rows", "group_size", "prompt", "completion")
                 for x in (f"--{k.replace('_', '-')}", str(getattr(a, k)))]]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
            raise SystemExit(f"{what}:{how} failed (exit {proc.returncode})")
        rows.append((what, how, json.loads(lines[-1][len("RESULT "):])))
    tokens = a.rows * a.completion
    print(f"torch {torch.__version__}, CPU; Qwen2.5-1.5B shape with {a.layers} of its 28 layers (fp32, random "
          f"weights), LoRA r=16 on all linear layers; {a.rows} completions of {a.completion} tokens after "
          f"{max(a.rows // a.group_size, 1)} prompt(s) of {a.prompt}\n")
    print("| what | log-probs | checkpointing | saved for backward MiB | peak MiB | s |")
    print("|---|---|---|---|---|---|")
    labels = {"plain": ("plain", "off"), "chunked": ("chunked", "off"), "checkpointing": ("chunked", "on")}
    for what, how, r in rows:
        lp, ck = labels[how] if what == "update" else (how, "-")
        name = "rl.update" if what == "update" else f"log-probs alone, bf16 logits [{a.rows}, {a.completion}, V]"
        print(f"| {name} | {lp} | {ck} | {r['saved_mib']:.0f} | {r['peak_mib']:.0f} | {r['s']:.1f} |")
    lp_plain, lp_chunk = rows[3][2], rows[4][2]
    per_token = lambda r, k: r[k] * MiB / tokens / 1e6  # noqa: E731 -- MB per answer token
    print(f"\nlog-probs, per answer token: saved {per_token(lp_plain, 'saved_mib'):.2f} MB plain, "
          f"{per_token(lp_chunk, 'saved_mib'):.2f} MB chunked; peak {per_token(lp_plain, 'peak_mib'):.2f} MB plain, "
          f"{per_token(lp_chunk, 'peak_mib'):.2f} MB chunked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
