"""The run directory's promises: one run at a time (a lock), a fresh run never mixes with an earlier one,
--resume continues the run it was started with, from the newest checkpoint that reads back whole (falling
back to the one before), and metrics.jsonl then holds each step once: lines the checkpoint does not cover
(logged after it, before a kill) are dropped, to be logged again. Checkpoints themselves (save, check,
load) are here too; this file imports no other file of ours but cli, so model.py can use it."""
import fcntl
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from cli import UsageError, writable_dir

SAME_RUN = ("task", "method", "model", "lora_r", "lora_alpha", "lora_targets",  # what --resume may not change
            "init_adapter", "warmup_steps", "refresh_failures", "solvable_k", "failure_credit")
_HELD = {}  # lock path -> open file: the lock lives as long as the process (the OS drops it on any death)


def lock(run_dir: Path):
    """An exclusive flock on <run_dir>/.lock, holding our pid; a second run on the directory gets one line.
    A killed run's lock is gone with its process, so it never blocks --resume."""
    writable_dir(run_dir, "--out-dir")
    path = (run_dir / ".lock").resolve()
    if path in _HELD:  # this process already holds it (tests call main twice)
        return
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise UsageError(f"{run_dir} is in use by another run (pid {holder}); wait for it to end, or pick "
                         "another --out-dir")
    except OSError:  # a filesystem without locks: run unlocked rather than not at all
        pass
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    _HELD[path] = f


def check_fresh(run_dir: Path):
    """A run without --resume must not append to, or overwrite, an earlier run's metrics and checkpoints."""
    found = [n for n in ("metrics.jsonl", "latest") if (run_dir / n).exists()] + checkpoint_names(run_dir)[:1]
    if found:
        raise UsageError(f"{run_dir} already holds a run ({', '.join(found)}): continue it with --resume, "
                         "or pick another --out-dir")


def check_same_run(args):
    """--resume with another model, LoRA shape, task or method would load weights that do not fit (or,
    worse, fit and mean something else). args.json is what the run was started with."""
    try:
        before = json.loads((args.out_dir / "args.json").read_text())
    except (OSError, ValueError):
        return  # no record (or a damaged one): the checkpoint's shape check still guards the weights
    changed = [k for k in SAME_RUN if isinstance(before, dict) and k in before and before[k] != str(getattr(args, k))]
    if changed:
        was = ", ".join(f"--{k.replace('_', '-')} {before[k]}" for k in changed)
        by = getattr(args, "preset_flags", {})  # a flag --quick or a recipe set: say so, the user never gave it
        now = ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" + (f" (set by {by[k]})" if k in by else "")
                        for k in changed)
        raise UsageError(f"--resume: {args.out_dir} was trained with {was}, not {now}; resume with the run's "
                         "settings, or pick another --out-dir")


def checkpoint_names(run_dir: Path) -> list[str]:
    """ckpt-* directories, newest (highest step) first."""
    return sorted((p.name for p in Path(run_dir).glob("ckpt-*") if p.is_dir() and p.name[5:].isdigit()),
                  key=lambda n: -int(n[5:]))


def candidates(run_dir: Path, say) -> list[Path]:
    """The checkpoints to try, newest first: the one `latest` names, then older ones. A checkpoint newer
    than the pointer was never published, so it is not used."""
    names, latest = checkpoint_names(run_dir), latest_checkpoint(run_dir)
    if latest is None:
        if (run_dir / "latest").exists() and names:
            say(f"--resume: {run_dir / 'latest'} is damaged; looking at the checkpoints themselves")
        return [run_dir / n for n in names]
    return [latest] + [run_dir / n for n in names if int(n[5:]) < int(latest.name[5:])]


def resume(args, model, optimizer, say) -> dict:
    """Load the newest checkpoint that reads back whole, saying which were skipped and why; the state."""
    run_dir, problems = args.out_dir, []
    for ckpt in candidates(run_dir, say):
        try:
            contents = read_checkpoint(ckpt, model, optimizer)
        except ValueError as e:
            problems.append(f"{ckpt.name}: {e}")
            say(f"--resume: {ckpt} is damaged ({e}); falling back to the checkpoint before it")
            continue
        state = load_checkpoint(ckpt, model, optimizer, contents)
        say(f"resumed from {ckpt} at step {state['step']}")
        return state
    if problems:
        raise UsageError(f"--resume: no checkpoint in {run_dir} reads back whole ({'; '.join(problems)})")
    # Killed before its first checkpoint: nothing to load, start again from step 0 (metrics trimmed to none).
    say(f"--resume: {run_dir} has no checkpoint yet; starting from step 0")
    return {"step": 0, "no_checkpoint": True}


def has_started(run_dir: Path) -> bool:
    """Did a run start here (worth resuming from step 0 when it has no checkpoint)?"""
    return any((run_dir / n).exists() for n in ("args.json", "metrics.jsonl", "latest")) or bool(
        checkpoint_names(run_dir))


def covered(record: dict, state: dict) -> bool:
    """Is a metrics line part of what the checkpoint holds? Re-ReST lines go by round, the rest by step."""
    if state.get("no_checkpoint"):  # nothing was saved: every line is logged again (the step-0 eval too)
        return False
    if "round" in record:
        return isinstance(record["round"], int) and record["round"] <= state.get("round", 0)
    return isinstance(record.get("step"), int) and record["step"] <= state["step"]


def trim_metrics(run_dir: Path, state: dict, say):
    """Drop the metrics lines the checkpoint does not cover (and any half-written line), atomically."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    lines = path.read_text(errors="replace").splitlines()
    keep = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and covered(record, state):
            keep.append(line)
    if len(keep) < len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
        say(f"metrics.jsonl: dropped {len(lines) - len(keep)} line(s) logged after the checkpoint "
            f"(step {state['step']}); those steps run again")


def clear_temporaries(run_dir: Path):
    """A save killed midway leaves its temporary directory; under the lock nothing else can be writing it.
    A `latest` that is a directory (resume fell back past it) would make the next save fail: it is moved
    aside, not deleted, since it is not ours."""
    for tmp in [*run_dir.glob(".tmp-ckpt-*"), run_dir / ".latest.tmp"]:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    latest = run_dir / "latest"
    if latest.is_dir() and not latest.is_symlink():
        aside = next(run_dir / f"latest.not-a-pointer{i or ''}" for i in range(1000)
                     if not (run_dir / f"latest.not-a-pointer{i or ''}").exists())
        latest.rename(aside)
        print(f"--resume: {latest} is a directory, not the checkpoint pointer; moved it to {aside}")


# ---------------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(run_dir: Path, model, optimizer, state: dict, keep: int = 2) -> Path:
    """Adapter (standard peft form) + optimizer + trainer state + RNG states, written to a temporary
    directory and then published by atomically replacing the `latest` pointer file: a kill at any
    moment leaves the previous checkpoint intact and pointed to."""
    run_dir = Path(run_dir)
    final = run_dir / f"ckpt-{state['step']:06d}"
    tmp = run_dir / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "adapter")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    # No CUDA RNG state: the sampler draws on the CPU, and a GPU run's state would tie the checkpoint to its
    # number of GPUs.
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = run_dir / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, run_dir / "latest")
    for old in sorted(run_dir.glob("ckpt-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir) -> Path | None:
    """The checkpoint the `latest` pointer names, or None: no pointer, or one that names no checkpoint."""
    try:
        name = (Path(run_dir) / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):  # missing, a directory, unreadable, binary garbage
        return None
    ckpt = Path(run_dir) / name
    return ckpt if re.fullmatch(r"ckpt-\d+", name) and ckpt.is_dir() else None


def read_checkpoint(ckpt: Path, model, optimizer) -> dict:
    """Every file of a checkpoint, read back and checked against this model and optimizer without changing
    either: ValueError("<file>: what is wrong") for a file that is missing, corrupt or of another shape."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    def read(name, load):
        try:
            return load(ckpt / name)
        except Exception as e:  # noqa: BLE001 -- json, pickle, safetensors and OS errors all mean "damaged"
            raise ValueError(f"{name}: {(str(e).strip().splitlines() or [type(e).__name__])[0][:160]}")
    state = read("state.json", lambda p: json.loads(p.read_text()))
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError("state.json: no integer step")
    if not isinstance(read("adapter/adapter_config.json", lambda p: json.loads(p.read_text())), dict):
        raise ValueError("adapter/adapter_config.json: not a JSON object")
    adapter = read("adapter/adapter_model.safetensors", load_file)
    want = {k: v.shape for k, v in get_peft_model_state_dict(model).items()}
    got = {k: v.shape for k, v in adapter.items()}
    if want != got:
        diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
        raise ValueError(f"adapter/adapter_model.safetensors: {len(diff)} tensor(s) missing or of another shape "
                         f"than this model's adapter, e.g. {diff[0]} (another --model or --lora-r?)")
    # map_location: a GPU run's tensors are read onto the CPU (a CPU-only machine can read them, and no rank
    # lands on GPU 0); optimizer.load_state_dict then moves each state to its parameter's device.
    opt = read("optimizer.pt", lambda p: torch.load(p, weights_only=False, map_location="cpu"))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    try:
        sizes = [len(g["params"]) for g in opt["param_groups"]]
        shapes_ok = all(v.shape == params[i].shape for i, st in opt["state"].items() for v in st.values()
                        if torch.is_tensor(v) and v.dim() > 0)
    except (KeyError, TypeError, IndexError, AttributeError):
        sizes, shapes_ok = None, False
    if sizes != [len(g["params"]) for g in optimizer.param_groups] or not shapes_ok:
        raise ValueError("optimizer.pt: not this model's optimizer state")
    rng = read("rng.pt", lambda p: torch.load(p, weights_only=False, map_location="cpu"))
    if not isinstance(rng, dict) or not {"python", "numpy", "torch"} <= rng.keys():
        raise ValueError("rng.pt: not the random-number states")
    return {"state": state, "adapter": adapter, "optimizer": opt, "rng": rng}


def load_checkpoint(ckpt: Path, model, optimizer, contents: dict | None = None) -> dict:
    """Restore adapter weights, optimizer and RNG states in place; return the trainer state. contents:
    what read_checkpoint returned, if it was already called (it is called here otherwise)."""
    from peft import set_peft_model_state_dict
    c = contents or read_checkpoint(ckpt, model, optimizer)
    set_peft_model_state_dict(model, c["adapter"])
    optimizer.load_state_dict(c["optimizer"])
    rng = c["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])  # an older checkpoint's "cuda" states are ignored (see save_checkpoint)
    return c["state"]
