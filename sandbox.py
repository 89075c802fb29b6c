"""The code verifier's sandbox: run an untrusted program and trusted tests in a child process.

`run(program, tests, trusted, entry_point, timeout, memory)` -> (outcome, message), where outcome
is "passed", "failed" (a test failed, or the program cheated), "error", "exited" or "timeout".
verifiers.code turns that into a Verdict; its docstring states the threat model.
Standard library only.
"""
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from functools import lru_cache

# The runner is the first code in the child process. It reads the job from stdin before any
# model code runs. The pass marker is a random nonce that the parent put in a pipe; the runner
# reads it only after the tests ran to their end, so while the program runs the nonce sits in
# the kernel's pipe buffer, in no Python object or frame the program could search. It exits with
# os._exit, so exit hooks set by the program cannot run after it. Exit codes: 2 a test failed,
# 3 other exception, 4 early SystemExit, 5 a cheat was caught (a returned object that fakes
# comparisons, or a module patched during the tests).
_RUNNER = r'''
import ast, builtins, io, _io, json, linecache, os, posix, resource, shutil, subprocess, sys
import traceback
from functools import wraps
from itertools import chain, islice
from types import FunctionType, ModuleType  # bound now: the program may patch the modules later

RISKY = {"__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__", "__len__",
         "__abs__", "__sub__", "__rsub__", "__float__", "__round__", "__iter__", "__contains__",
         "__getattr__", "__getattribute__"}

class CheatError(Exception):
    pass

def spoofs(cls):  # a class from the program that redefines comparison or arithmetic
    risky = [cls.__dict__[name] for name in RISKY & cls.__dict__.keys()]
    return bool(risky) and (cls.__module__ == "__solution__" or any(
        getattr(getattr(f, "__code__", None), "co_filename", "") == "<solution>" for f in risky))

def reject_spoofs(value):
    stack, budget = [value], 10000
    while stack and budget > 0:
        item, budget = stack.pop(), budget - 1
        if any(spoofs(cls) for cls in type(item).__mro__):
            raise CheatError(f"returned a {type(item).__name__} object that overrides "
                             "comparison or arithmetic; return built-in values only")
        if isinstance(item, dict):
            stack.extend(islice(chain(item, item.values()), budget))
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(islice(item, budget))

def checked(fn):
    @wraps(fn)
    def wrapper(*args, **kwargs):
        result = fn(*args, **kwargs)
        reject_spoofs(result)
        return result
    return wrapper

def guard(root):
    """Disable tracing, destructive functions and writes outside the work dir: a seat belt
    against accidents, not a wall against a determined attacker (the OS limits are the wall)."""
    def blocked(*args, **kwargs):
        raise PermissionError("disabled in the sandbox")
    for name in ("system", "kill", "killpg", "fork", "forkpty", "popen", "remove", "unlink",
                 "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "chmod",
                 "chown", "lchown", "fchmod", "fchown", "link", "symlink", "chdir", "chroot",
                 "execv", "execve", "spawnv", "spawnve", "posix_spawn", "posix_spawnp", "setuid",
                 "setgid", "mkfifo", "mknod", "utime"):
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, blocked)
    shutil.rmtree = shutil.move = shutil.chown = subprocess.Popen = blocked
    resource.setrlimit = sys.settrace = sys.setprofile = blocked  # a tracer can skip asserts

    def outside(file):
        return not os.path.realpath(os.fsdecode(file)).startswith(root + os.sep)
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    def sandbox_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not isinstance(file, int) and outside(file):
            raise PermissionError(f"writing outside the work dir is disabled: {file}")
        return real_open(file, mode, *args, **kwargs)
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    def sandbox_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & writes and (dir_fd is not None or outside(path)):
            raise PermissionError(f"writing outside the work dir is disabled: {path}")
        return real_os_open(path, flags, mode)
    def sandbox_mkdir(path, mode=0o777, *, dir_fd=None):
        if dir_fd is not None or outside(path):
            raise PermissionError(f"writing outside the work dir is disabled: {path}")
        return real_mkdir(path, mode)
    class SandboxFileIO(_io.FileIO):
        def __init__(self, file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+") and not isinstance(file, int) and outside(file):
                raise PermissionError(f"writing outside the work dir is disabled: {file}")
            super().__init__(file, mode, *args, **kwargs)
    builtins.open = io.open = _io.open = sandbox_open
    io.FileIO = _io.FileIO = SandboxFileIO
    os.open = posix.open = sandbox_os_open
    os.mkdir = posix.mkdir = sandbox_mkdir
    builtins.exit = builtins.quit = sys.exit  # what `site` would add; python runs with -S

def imported_names(*sources):
    names = set()
    for source in sources:
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
    return names

def snapshot():
    """Every loaded module's attributes, to undo and detect the program's patches."""
    return {name: (module, dict(vars(module))) for name, module in list(sys.modules.items())
            if isinstance(module, ModuleType)}

def restore(saved):
    for name, (module, attributes) in saved.items():
        sys.modules[name] = module  # also undoes fake modules planted under known names
        current = vars(module)
        for key, value in attributes.items():
            if current.get(key, saved) is not value:
                current[key] = value

def patched(saved):
    """Functions and classes of loaded modules that are no longer the ones snapshotted."""
    return [f"{name}.{key}" for name, (module, attributes) in saved.items()
            for key, value in attributes.items()
            if callable(value) and vars(module).get(key, saved) is not value]

def run(source, filename, namespace):
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), namespace)

def main():
    job = json.loads(sys.stdin.read())
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    write, read, exit_now, secret_fd = os.write, os.read, os._exit, job["secret_fd"]
    for name, limit in [("RLIMIT_AS", job["memory"]), ("RLIMIT_CPU", job["cpu"]),
                        ("RLIMIT_FSIZE", 10 ** 7), ("RLIMIT_NPROC", 0), ("RLIMIT_CORE", 0)]:
        try:
            resource.setrlimit(getattr(resource, name), (limit, limit))
        except (ValueError, OSError):
            pass
    for name in imported_names(job["tests"], job["trusted"]):  # load them before the program
        try:                                                    # can plant or patch them
            __import__(name)
        except Exception:
            pass
    guard(os.path.realpath(os.getcwd()))
    saved = snapshot()
    # not "__main__": a demo block under `if __name__ == "__main__":` is not part of the answer
    saved_builtins, namespace = dict(builtins.__dict__), {"__name__": "__solution__"}
    in_tests = False  # an AssertionError in the program itself is a runtime error
    try:
        run(job["program"], "<solution>", namespace)
        builtins.__dict__.clear()  # undo any tampering with builtins and modules before tests
        builtins.__dict__.update(saved_builtins)
        restore(saved)
        namespace["__builtins__"] = builtins
        tests_namespace = {name: checked(value) if isinstance(value, FunctionType) and
                           value.__code__.co_filename == "<solution>" else value
                           for name, value in namespace.items()}
        # the prompt's own helpers (HumanEval/38's encode_cyclic), rebuilt from the trusted
        # prompt: the tests call them, so the program must not be able to redefine them
        helpers = {"__name__": "__prompt__"}
        run(job["trusted"], "<prompt>", helpers)
        tests_namespace.update({name: value for name, value in helpers.items()
                                if not name.startswith("__") and name != job["entry_point"]})
        in_tests = True
        run(job["tests"], "<tests>", tests_namespace)
        builtins_changed = [k for k, v in saved_builtins.items() if builtins.__dict__.get(k) is not v]
        changed = patched(saved) + builtins_changed
        if changed:
            raise CheatError(f"the program patched {', '.join(sorted(changed)[:5])} during the tests")
    except BaseException as e:
        tb = e.__traceback__  # show only the program's and the tests' frames
        while tb is not None and tb.tb_frame.f_code.co_filename not in ("<solution>", "<tests>"):
            tb = tb.tb_next
        write(2, "".join(traceback.format_exception(type(e), e, tb)).encode(errors="replace"))
        exit_now(4 if isinstance(e, SystemExit) else 5 if isinstance(e, CheatError)
                 else 2 if in_tests and isinstance(e, AssertionError) else 3)
    write(1, b"\n" + read(secret_fd, 64) + b"\n")
    exit_now(0)

main()
'''


@lru_cache(maxsize=1)
def sandbox_user() -> tuple[str, int | None]:
    """(python, uid) to run model code with. As root, run it as `nobody` with our Python if
    `nobody` can start it, else with the system Python of the same version (a pyenv under /root
    is private); otherwise, and when not root, as the caller."""
    if os.name != "posix" or os.geteuid() != 0:
        return sys.executable, None
    same_version = f"import sys; assert sys.version_info[:2] == {tuple(sys.version_info[:2])}"
    for python in dict.fromkeys([sys.executable, "/usr/bin/python3"]):
        try:
            probe = subprocess.run([python, "-I", "-S", "-c", same_version], user=65534,
                                   group=65534, extra_groups=[], cwd="/", capture_output=True,
                                   timeout=30)
            if probe.returncode == 0:
                return python, 65534
        except (OSError, subprocess.SubprocessError):
            pass
    return sys.executable, None


def _tail(file, limit: int) -> str:
    file.seek(0, os.SEEK_END)
    file.seek(max(0, file.tell() - limit))
    return file.read().decode(errors="replace")


def run(program: str, tests: str, trusted: str, entry_point: str, timeout: float,
        memory: int) -> tuple[str, str]:
    nonce = secrets.token_hex(16)
    secret_read, secret_write = os.pipe()
    os.write(secret_write, nonce.encode())  # 32 bytes: far below a pipe's buffer
    os.close(secret_write)
    job = json.dumps({"program": program, "tests": tests, "trusted": trusted,
                      "entry_point": entry_point, "secret_fd": secret_read, "memory": memory,
                      "cpu": int(timeout) + 2}).encode()
    python, uid = sandbox_user()
    try:
        with tempfile.TemporaryDirectory(prefix="r3_code_", ignore_cleanup_errors=True) as workdir, \
                tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            if uid is not None:
                os.chown(workdir, uid, uid)
            ids = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
            env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
            proc = subprocess.Popen([python, "-I", "-S", "-c", _RUNNER], stdin=subprocess.PIPE,
                                    stdout=out, stderr=err, cwd=workdir, env=env,
                                    pass_fds=(secret_read,), start_new_session=True, **ids)
            os.close(secret_read)
            secret_read = None
            try:
                proc.communicate(job, timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:  # kill the whole session: also anything the program forked
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                proc.wait()
                try:
                    proc.stdin.close()  # still open if the timeout hit while writing the job
                except OSError:
                    pass
            stdout, stderr = _tail(out, 4096), _tail(err, 1000).strip()
    finally:
        if secret_read is not None:
            os.close(secret_read)
    rc = proc.returncode
    if timed_out:
        return "timeout", f"timed out after {timeout:g} s\n{stderr}".strip()
    if rc == 0 and nonce in stdout:
        return "passed", ""
    if rc in (0, 4):
        return "exited", f"the program exited before the tests finished\n{stderr}".strip()
    if rc in (2, 5):
        return "failed", stderr or "a test failed"
    if rc < 0:
        return "error", f"killed by signal {-rc}\n{stderr}".strip()
    return "error", stderr or f"exited with code {rc}"
