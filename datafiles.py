"""Reading a user's data file (--source): JSON lines, a JSON array, parquet, or a Hugging Face Hub dataset,
as [(where, row)] for tasks.py's row readers. Whatever is wrong with the file (not UTF-8, not JSON, nested
too deeply, unreadable parquet, offline Hub) is one UsageError naming the file and, where known, the line."""
import json
from pathlib import Path

from cli import UsageError

FILE_SUFFIXES = (".json", ".jsonl", ".parquet")


def read_file(path):
    """[(where, row)], where is 'file:line' for JSON lines, 'file item i' / 'file row i' otherwise."""
    suffix = path.suffix.lower()  # data.JSONL is JSON lines too
    if suffix not in FILE_SUFFIXES:
        raise UsageError(f"{path}: unsupported file type; use {', '.join(FILE_SUFFIXES)}")
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UsageError("parquet files need the `pyarrow` package: pip install pyarrow")
        try:  # pyarrow itself, not datasets: datasets logs its own error lines before raising
            data = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 -- pyarrow raises many kinds; each means the same: unreadable
            raise UsageError(f"{path}: not a readable parquet file ({first_line(e)})")
        return [(f"{path} row {i + 1}", row) for i, row in enumerate(data)]
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{path}: cannot read the file ({e.strerror or e})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}:{raw[:e.start].count(10) + 1}: not UTF-8 text (byte {raw[e.start]:#04x})")
    if suffix == ".json" and text.lstrip().startswith("["):  # a JSON array; otherwise JSON lines
        return [(f"{path} item {i + 1}", row) for i, row in enumerate(parse_json(text, path))]
    return [(f"{path}:{lineno}", parse_json(line, f"{path}:{lineno}"))
            for lineno, line in enumerate(text.splitlines(), 1) if line.strip()]


def parse_json(text, where):
    """json.loads, with every way it can fail as one line naming where."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}{f':{e.lineno}' if isinstance(where, Path) else ''}: not valid JSON ({e.msg})")
    except RecursionError:
        raise UsageError(f"{where}: not usable JSON (nested too deeply)")
    except ValueError as e:  # e.g. an integer of more than 4,300 digits
        raise UsageError(f"{where}: not usable JSON ({first_line(e)})")


def first_line(e: Exception) -> str:
    """An exception's message, first line, capped: enough to say what is wrong on one line."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def read_hub(name):
    from model import hub_offline_mode, hub_reachable
    if not hub_offline_mode() and not hub_reachable():  # not after 30 s of retries, each logged
        raise UsageError(f"could not load {name!r} from the Hugging Face Hub (it cannot be reached); pass a "
                         f"local {'/'.join(FILE_SUFFIXES)} file instead, or set HF_HUB_OFFLINE=1 to use a copy "
                         "downloaded before")
    try:
        data = _datasets().load_dataset(name)
    except Exception as e:  # offline, unknown, gated: the same advice
        reason = first_line(e)
        raise UsageError(f"could not load {name!r} from the Hugging Face Hub ({reason}); the Hub may be "
                         f"unreachable -- pass a local {'/'.join(FILE_SUFFIXES)} file instead")
    split = "train" if "train" in data else next(iter(data))
    return [(f"{name} [{split}] row {i + 1}", row) for i, row in enumerate(data[split])]


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UsageError("Hub datasets need the `datasets` package: pip install datasets")
    return datasets
