"""The edge of every command: a user's mistake becomes one clear line and exit code 2. Every entry
point imports this first, so it is also where third-party noise is turned down."""
import logging
import sys

# bitsandbytes, imported by peft on every run, logs a warning on CPUs with AVX512-BF16 when the optional
# `kernels` package (a faster CPU 4-bit matmul) is missing: noise on a run without --4bit, and only a
# speed hint with it. Its errors still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class UsageError(Exception):
    """A missing file, malformed row, unknown task or model: reported as one line, exit code 2."""


def run(main):
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
