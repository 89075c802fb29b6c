"""The run directory's promises: one run at a time (a lock), a fresh run never mixes with an earlier one,
--resume continues the run it was started with, from the newest checkpoint that reads back whole (falling
back to the one before), and metrics.jsonl then holds each step once: lines the checkpoint does not cover
(logged after it, before a kill) are dropped, to be logged again."""
import fcntl
import json
import os
import shutil
from pathlib import Path

import rl
from cli import UsageError, writable_dir

SAME_RUN = ("task", "method", "model", "lora_r", "lora_alpha", "lora_targets",  # what --resume may not change
            "init_adapter", "warmup_steps", "refresh_failures")
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
    names, latest = checkpoint_names(run_dir), rl.latest_checkpoint(run_dir)
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
            contents = rl.read_checkpoint(ckpt, model, optimizer)
        except ValueError as e:
            problems.append(f"{ckpt.name}: {e}")
            say(f"--resume: {ckpt} is damaged ({e}); falling back to the checkpoint before it")
            continue
        state = rl.load_checkpoint(ckpt, model, optimizer, contents)
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
