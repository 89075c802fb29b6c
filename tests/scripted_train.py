"""Run train_r3.py with a scripted verifier (a tiny random model never passes a real one), so tests
in a subprocess (SIGKILL + resume, torchrun) exercise real updates. Correct iff crc32(text) is even."""
import os
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import tasks  # noqa: E402
import train_r3  # noqa: E402
import verifiers  # noqa: E402
from verifiers import Verdict  # noqa: E402


def scripted_verify(task, text, example):
    """R3_SCRIPTED_PARTIAL=1: the failures earn three levels of partial credit (missed_target 0.5,
    wrong_numbers 0.25, none), so rewards that compare a retry with its attempt (--retry-reward progress,
    no-worse) differ from the verifier's."""
    crc = zlib.crc32(text.encode())
    if crc % 2 == 0:
        return Verdict(True, None, "scripted verdict")
    levels = {1: "missed_target", 3: "wrong_numbers"} if os.environ.get("R3_SCRIPTED_PARTIAL") == "1" else {}
    return Verdict(False, levels.get(crc % 8, "scripted"), "scripted verdict")


def scripted_same_answer(task, retry, attempt):
    """A tiny random model's retry never repeats its attempt's answer; a third of them do here, by crc32,
    so --repeat-reward changes rewards in these runs."""
    return zlib.crc32(retry.encode()) % 3 == 0


def kill_at(point: str, step: int):
    """SIGKILL this process at an exact code point of step's checkpoint (R3_KILL_AT=point:step):
    "before-save" (its metrics line written, its checkpoint not), "in-save" (the files written, not yet
    published) or "pointer" (published, the `latest` pointer not yet swapped)."""
    import os
    import signal
    import rundir
    save, replace = rundir.save_checkpoint, os.replace
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731

    def save_checkpoint(run_dir, model, optimizer, state, **kw):
        if state["step"] == step and point == "before-save":
            die()
        return save(run_dir, model, optimizer, state, **kw)

    def os_replace(src, dst):
        name = Path(src).name
        if (point == "in-save" and name == f".tmp-ckpt-{step:06d}") or \
                (point == "pointer" and name == ".latest.tmp" and Path(src).read_text() == f"ckpt-{step:06d}"):
            die()
        return replace(src, dst)
    rundir.save_checkpoint, os.replace = save_checkpoint, os_replace


if __name__ == "__main__":
    tasks.verify = scripted_verify
    verifiers.same_answer = scripted_same_answer
    if os.environ.get("R3_KILL_AT"):
        where, at = os.environ["R3_KILL_AT"].split(":")
        kill_at(where, int(at))
    cli.run(lambda: train_r3.main(sys.argv[1:]))
