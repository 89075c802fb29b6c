"""The edge of every command: a user's mistake becomes one clear line and exit code 2. Every entry
point imports this first, so it is also where third-party noise is turned down."""
import argparse
import logging
import math
import os
import sys
from pathlib import Path

# bitsandbytes, imported by peft on every run, logs a warning on CPUs with AVX512-BF16 when the optional
# `kernels` package (a faster CPU 4-bit matmul) is missing: noise on a run without --4bit, and only a
# speed hint with it. Its errors still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def on_terminal() -> bool:
    """Where progress goes, decided here for every command. Bars are for a person at a terminal; in a log
    (stderr a file or a pipe) a bar's redraws leave a line per refresh and cursor escapes, so there no bar
    is drawn and each loop prints one plain line per step instead (progress_line)."""
    return sys.stderr.isatty()


if not on_terminal():  # transformers' own bars ("Loading weights") too: it reads this when it is imported
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def bar(**kwargs):
    """A tqdm bar, drawn at a terminal by rank 0 only (torchrun); elsewhere a disabled one, whose update,
    set_postfix and close do nothing (iterating it still yields, tqdm.write still prints)."""
    from tqdm import tqdm
    return tqdm(disable=not on_terminal() or os.environ.get("RANK", "0") != "0", **kwargs)


def progress_line(line: str):
    """What a log gets where a terminal gets a bar: one plain line, from rank 0, flushed so it is in the
    log when it happens."""
    if not on_terminal() and os.environ.get("RANK", "0") == "0":
        print(line, flush=True)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a flag it rejects (an unknown --task, a missing value) is one line too, not
    the usage block with the error under it; --help still prints everything."""

    def error(self, message):
        self.exit(2, f"error: {message} ({self.prog} --help lists every flag)\n")


class UsageError(Exception):
    """A missing file, malformed row, unknown task or model: reported as one line, exit code 2."""


def run(main):
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def first_line(e: Exception) -> str:
    """An exception's message, first line, capped: enough to say what is wrong on one line."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def check_flags(rules: list[tuple[str, object, bool, str]]):
    """rules: (flag, value, ok, what it must be). The first broken one is the error. A number flag is never
    inf or nan: argparse's float() takes both, and no limit like `>= 0` rules out inf."""
    for flag, value, ok, want in rules:
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number; got {value}")
        if not ok:
            raise UsageError(f"{flag} must be {want}; got {value}")


def check_not_empty(parser, args):
    """A path or name flag given as "" would silently mean its default (--out-dir "" trained into runs/...)."""
    for action in parser._actions:
        values = getattr(args, action.dest, None)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str) and not value.strip():
                raise UsageError(f"{(action.option_strings or [action.dest])[-1]} is empty")


def writable_dir(path, flag: str) -> Path:
    """A directory we can write in (made if missing), or one line saying why not."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot create the directory ({e.strerror or e})")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: the directory is not writable")
    return path


def new_dir(path, flag: str) -> Path:
    """A directory that does not exist yet and can be made: checked by making it (and any missing parents)
    and taking them back, so an --out under a file, in /proc or in a read-only place is one line before
    the work, not a traceback after it."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise UsageError(f"{flag} {path} already exists; give a new directory")
    missing = [p for p in [path, *path.parents] if not p.exists() and not p.is_symlink()]
    above = path.parents[len(missing) - 1]
    if not above.is_dir():
        raise UsageError(f"{flag} {path}: {above} is not a directory")
    try:
        path.mkdir(parents=True)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot create the directory ({e.strerror or e})")
    finally:
        for p in missing:  # deepest first
            try:
                p.rmdir()
            except OSError:
                pass
    return path


def writable_file(path, flag: str) -> Path:
    """A file path whose directory we can write in (checked before the work, not after)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory, not a file")
    writable_dir(path.parent, flag)
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path}: the file is not writable")
    return path
