"""The edge of every command: a user's mistake becomes one clear line and exit code 2."""
import sys
class UsageError(Exception):
    """A missing file, malformed row, unknown task or model: reported as one line, exit code 2."""
def run(main):
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
