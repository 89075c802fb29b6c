"""Progress a person reads: bars at a terminal; in a log (stderr a file), one plain line per step, per eval
and per failure set, with no escape codes and no carriage returns."""
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading

from conftest import ROOT

TRAIN = ["--task", "countdown", "--train-size", "8", "--eval-size", "2", "--max-new-tokens", "6",
         "--reflect-tokens", "6", "--group-size", "4", "--batch-size", "2", "--lora-r", "4",
         "--steps", "3", "--warmup-steps", "1", "--eval-every", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def log_of(argv, tmp_path) -> str:
    """A command's stdout and stderr together in one file, as `cmd > log 2>&1` leaves them."""
    log = tmp_path / "log"
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, *argv], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=ENV,
                           timeout=300)
    text = log.read_text()
    assert r.returncode == 0, text[-3000:]
    return text


def test_a_training_log_has_one_plain_line_per_step(tiny_model_dir, tmp_path):
    text = log_of(["train_r3.py", "--model", str(tiny_model_dir), *TRAIN, "--out-dir", str(tmp_path / "run")],
                  tmp_path)
    assert "\x1b" not in text and "\r" not in text  # no cursor escapes, no bar redraws
    steps = re.findall(r"^step (\d+)/3 r3 countdown \((\w+)\): reward [\d.]+, signal [\d.]+, ", text, re.M)
    assert steps == [("1", "warmup"), ("2", "r3"), ("3", "r3")]
    evals = re.findall(r"^step \d+: eval first try ([\d.]+), second try ([\d.]+), Δ i→c ([+-][\d.]+), "
                       r"Δ c→i ([+-][\d.]+)$", text, re.M)
    assert len(evals) == 3  # step 0, step 2, the last; each with its Δ i→c
    for t1, t2, i2c, c2i in evals:  # the second try differs from the first by what it fixed and what it broke
        assert abs(float(t2) - float(t1) - (float(i2c) - float(c2i))) < 2e-3
    assert len(re.findall(r"^failure set after step 1: ", text, re.M)) == 1
    assert "Loading weights" not in text and "it/s" not in text and "tok/s" not in text


def test_an_eval_log_has_one_plain_line_per_chunk(tiny_model_dir, tmp_path):
    text = log_of(["eval.py", "--model", str(tiny_model_dir), "--task", "countdown", "--n", "3", "--batch-size", "2",
                   "--max-new-tokens", "6", "--reflect-tokens", "6", "--out", str(tmp_path / "evals")], tmp_path)
    assert "\x1b" not in text and "\r" not in text
    assert re.findall(r"^base: (\d)/3 examples, ", text, re.M) == ["2", "3"]


def test_a_terminal_gets_bars_and_no_plain_step_lines(tiny_model_dir, tmp_path):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 columns wide
    chunks = []
    reader = threading.Thread(target=lambda: read_all(master, chunks))
    reader.start()
    r = subprocess.run([sys.executable, "train_r3.py", "--model", str(tiny_model_dir), *TRAIN,
                        "--out-dir", str(tmp_path / "run")], cwd=ROOT, stdout=subprocess.PIPE, stderr=slave,
                       env=ENV, timeout=300, text=True)
    os.close(slave)
    reader.join(timeout=30)
    os.close(master)
    bars = b"".join(chunks).decode(errors="replace")
    assert r.returncode == 0, bars[-3000:]
    assert "r3 countdown: 100%" in bars and "\r" in bars  # the step bar, redrawn in place
    assert not re.search(r"^step \d+/3 ", r.stdout, re.M)  # the bar says it; no plain line besides
    assert "step 0: eval first try" in r.stdout


def read_all(fd, chunks):
    """Drain a pty's master side until the child side is closed (so the child never blocks on a full pty)."""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO once the slave side is closed
            return
        if not data:
            return
        chunks.append(data)
