"""Run under torchrun (2 gloo ranks) by tests/test_train.py: rl.in_sync must see parameters that differ
between ranks, and agree after rl.broadcast_params."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rl  # noqa: E402

dist.init_process_group("gloo")
rank = dist.get_rank()
params = [torch.nn.Parameter(torch.full((3, 2), float(rank))), torch.nn.Parameter(torch.zeros(4))]
before = rl.in_sync(params)
rl.broadcast_params(params)
print(f"in sync before: {before}, after: {rl.in_sync(params)}")
dist.destroy_process_group()
