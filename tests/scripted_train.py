"""Run train_r3.py with a scripted verifier (a tiny random model never passes a real one), so tests
in a subprocess (SIGKILL + resume, torchrun) exercise real updates. Correct iff crc32(text) is even."""
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import tasks  # noqa: E402
import train_r3  # noqa: E402
from verifiers import Verdict  # noqa: E402


def scripted_verify(task, text, example):
    ok = zlib.crc32(text.encode()) % 2 == 0
    return Verdict(ok, None if ok else "scripted", "scripted verdict")


if __name__ == "__main__":
    tasks.verify = scripted_verify
    cli.run(lambda: train_r3.main(sys.argv[1:]))
