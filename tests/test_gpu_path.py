"""The GPU user's path, checked on the CPU: checkpoints from another device layout, device choice under
torchrun, chat templates that refuse a system turn, stop tokens, chunked log-probs, activation
checkpointing, token-capped micro-batches, the data-parallel helpers, and no import circle."""
import ast
import io

import pytest
import torch

import rundir
from conftest import ROOT


# ---------------------------------------------------------------------------------------------- imports

def imports_of(path) -> set[str]:
    """Our top-level modules that a file imports anywhere (module level or inside functions)."""
    ours = {p.stem for p in ROOT.glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & ours - {path.stem}


def test_no_import_circle_among_the_top_level_files():
    graph = {p.stem: imports_of(p) for p in ROOT.glob("*.py")}
    state = {}  # 1: on the current path, 2: done

    def visit(name, path):
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join(path + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2
    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert graph["model"] <= {"cli", "rundir"}, graph["model"]


# ---------------------------------------------------------------------------------------------- checkpoints

def saved_as_if_on(device: str, obj, path):
    """torch.save with every storage tagged as living on `device` (what a GPU run writes): loading it
    without a map_location on a machine without that device raises."""
    import torch.serialization as ser
    tag = ser.location_tag
    ser.location_tag = lambda storage: device
    try:
        torch.save(obj, path)
    finally:
        ser.location_tag = tag


def test_a_checkpoint_from_another_device_layout_resumes(tiny_model_dir, tmp_path):
    import model as model_lib
    m, _ = model_lib.load_model(str(tiny_model_dir), lora_r=4, device="cpu")
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    m(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    ckpt = rundir.save_checkpoint(tmp_path, m, opt, {"step": 3})
    want = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    # the optimizer's tensors tagged cuda:1, and the CUDA RNG states of 8 GPUs (an older checkpoint's layout)
    saved_as_if_on("cuda:1", opt.state_dict(), ckpt / "optimizer.pt")
    rng = torch.load(ckpt / "rng.pt", weights_only=False)
    rng["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 8
    saved_as_if_on("cuda:0", rng, ckpt / "rng.pt")
    with pytest.raises(RuntimeError, match="CUDA"):  # the simulation holds: a plain load refuses
        torch.load(ckpt / "optimizer.pt", weights_only=False)
    torch.manual_seed(123)  # moved on since the save
    fresh = torch.optim.AdamW(params, lr=1e-3)
    assert rundir.latest_checkpoint(tmp_path) == ckpt
    state = rundir.load_checkpoint(ckpt, m, fresh)
    assert state["step"] == 3
    got = fresh.state_dict()["state"][0]
    assert all(torch.equal(got[k].cpu(), want[k]) and got[k].device == params[0].device or k == "step"
               for k in want)
    assert torch.equal(torch.get_rng_state(), rng["torch"])  # the checkpoint's CPU RNG state is back


# ---------------------------------------------------------------------------------------------- devices

@pytest.mark.parametrize("gpus, local_rank, want", [(0, 0, "cpu"), (0, 1, "cpu"), (2, 1, "cuda:1"),
                                                     (1, 0, "cuda:0"), (1, 1, "cuda:0"), (1, 3, "cuda:0")])
def test_each_rank_gets_a_device_it_can_see(gpus, local_rank, want, monkeypatch):
    """A GPU stand-in: a launcher that gives each process one GPU shows it as cuda:0, whatever LOCAL_RANK."""
    import loop
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert loop.rank_device(local_rank) == want


def test_the_rank_tests_hide_cuda():
    from test_train import on_the_cpu
    assert on_the_cpu({"A": "1"}) == {"A": "1", "CUDA_VISIBLE_DEVICES": ""}
