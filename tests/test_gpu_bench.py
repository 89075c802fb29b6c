"""bench/gpu_bench.py (and bench/r3_step_bench.py, which it runs) work end to end: a CPU dry run on a
2-layer random model, and the clean exit on a machine without CUDA."""
import os
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "gpu_bench.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA message is for machines without a GPU")
def test_gpu_bench_without_cuda_says_so():
    proc = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "no CUDA device", proc.stderr[-2000:]


def test_gpu_bench_dry_run(tiny_model_dir):  # the fixture: the embedded tokenizer is converted already
    proc = subprocess.run([sys.executable, SCRIPT, "--dry-run"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "| sample.generate tok/s" in out.replace("| prompt tokens | groups x n | new tokens ", "")
    row = next(line for line in out.splitlines() if line.startswith("| bf16 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) > 0 and float(cells[4].split()[0]) > 0  # a step, and an update that ran
    row = next(line for line in out.splitlines() if line.startswith("| bf16 + --grad-checkpointing |"))
    assert float(row.strip("|").split("|")[4].split()[0]) > 0
    assert "| 4-bit + LoRA | skipped (needs CUDA)" in out


def test_grpo_vs_trl_bench_runs(tiny_model_dir):
    """bench/grpo_vs_trl.py end to end at toy size on the tiny model, both sides: its table comes out with
    a step time for ours and for TRL (it had broken once, unnoticed, when train_step's signature changed)."""
    script = os.path.join(os.path.dirname(SCRIPT), "grpo_vs_trl.py")
    proc = subprocess.run([sys.executable, script, "--model", str(tiny_model_dir), "--prompts", "1", "--group-size",
                           "2", "--max-new-tokens", "4", "--max-steps", "1", "--warmup", "0", "--micro-batch", "2",
                           "--lora-r", "4"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| total s/step |"))
    ours, trl = (float(c) for c in row.strip("|").split("|")[1:3])
    assert ours > 0 and trl > 0
