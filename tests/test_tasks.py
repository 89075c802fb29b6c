"""tasks.py: every source loads, splits are fixed and disjoint, local formats load, mistakes are one clear line."""
import json

import pytest

import datafiles
import tasks
import verifiers
from cli import UsageError

BUILTIN = [(task, source) for task in tasks.TASK_NAMES for source in tasks.SOURCES[task]]
NEEDS = {"countdown": {"nums", "target"}, "function_calling": {"query", "tools", "answers"},
         "math": {"problem", "answer"}, "code": {"prompt", "entry_point", "test"}}


def _both(task, **kw):
    return tasks.load_examples(task, "train", **kw), tasks.load_examples(task, "test", **kw)


@pytest.mark.parametrize("task,source", BUILTIN)
def test_builtin_source_loads_with_disjoint_fixed_splits(task, source):
    n = 2000 if source == "generated" else None  # the full 10,000 are slow to generate
    train, test = _both(task, source=source, n=n)
    assert train and test
    for ex in train + test:
        assert isinstance(ex["id"], str) and NEEDS[task] <= ex.keys()
    assert len({ex["id"] for ex in train + test}) == len(train) + len(test)  # unique and disjoint
    if task == "countdown":
        problems = lambda exs: {(tuple(sorted(ex["nums"])), ex["target"]) for ex in exs}
        assert not problems(train) & problems(test)
    assert tasks.load_examples(task, "test", source=source, n=n) == test  # same seed, same split
    assert tasks.load_examples(task, "test", source=source, n=3) == test[:3]  # n takes the first n


def test_default_sources_and_seeds():
    assert tasks.DEFAULT_SOURCE == {"countdown": "generated", "function_calling": "bfcl", "math": "math500",
                                    "code": "humaneval"}
    assert tasks.load_examples("math", "test") == tasks.load_examples("math", "test", source="math500", seed=0)
    assert tasks.load_examples("math", "test", seed=1) != tasks.load_examples("math", "test", seed=0)
    a, b = (tasks.load_examples("countdown", "test", n=20, seed=s) for s in (0, 1))
    assert a != b


@pytest.mark.parametrize("source", ["generated", "easy"])
def test_generated_countdown_is_solvable_by_construction(source):
    import verifiers
    for split in tasks.SPLITS:
        for ex in tasks.load_examples("countdown", split, source=source, n=300):
            verdict = verifiers.countdown(f"<answer>{ex['solution']}</answer>", ex)
            assert verdict.correct, (ex, verdict)
            if source == "easy":
                assert 2 <= len(ex["nums"]) <= 3 and max(ex["nums"]) <= 9 and "/" not in ex["solution"]
            else:
                assert 3 <= len(ex["nums"]) <= 4 and 10 <= ex["target"] <= 100


def test_bfcl_canonical_answers_fit_the_ground_truth():
    pytest.importorskip("verifiers")
    for ex in tasks.load_examples("function_calling", "test"):
        assert {c["name"] for c in ex["answers"]} <= {t["name"] for t in ex["tools"]}
        assert tasks.verify("function_calling", json.dumps(ex["answers"]), ex).correct, ex["id"]


SELF_CONTRADICTING = ["simple_python_17", "parallel_multiple_12", "live_multiple_964-207-0"]


def test_bfcl_drops_rows_that_contradict_their_schema(monkeypatch, capsys):
    """Rows whose gold uses an argument the tool lacks (parallel_multiple_12), or lets a
    required one be left out (simple_python_17): no answer could pass the schema check."""
    pytest.importorskip("bfcl_eval")
    monkeypatch.setattr(tasks, "_REPORTED", [])
    ids = {ex["id"] for ex in tasks.BUILTIN["bfcl"]()}
    assert len(ids) == 2331 and not ids & set(SELF_CONTRADICTING)
    assert "simple_python_16" in ids and "parallel_multiple_11" in ids
    assert capsys.readouterr().err.splitlines() == [
        "bfcl: dropped 18 rows whose gold answer contradicts their own tool schema"]
    tasks.BUILTIN["bfcl"]()
    assert capsys.readouterr().err == ""  # said once


def test_builtin_answers_pass_their_verifiers():
    pytest.importorskip("verifiers")
    for source in tasks.SOURCES["math"]:
        ex = tasks.load_examples("math", "test", source=source, n=1)[0]
        assert tasks.verify("math", f"So the answer is \\boxed{{{ex['answer']}}}.", ex).correct
    ex = tasks.load_examples("code", "test", n=1)[0]
    assert tasks.verify("code", f"```python\n{ex['prompt']}{ex['canonical_solution']}```", ex).correct


# ------------------------------------------------------------------ local files in the real formats
def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_countdown_jsonl_and_json(tmp_path):
    rows = [{"nums": [i, 2, 3], "target": i + 5} for i in range(1, 21)] + [{"nums": [3, 2, 1], "target": 6}]
    (tmp_path / "cd.json").write_text(json.dumps(rows, indent=1))  # a JSON array
    for path in (_jsonl(tmp_path / "cd.jsonl", rows), str(tmp_path / "cd.json")):
        train, test = _both("countdown", source=path)
        assert len(train) + len(test) == 20  # the repeated problem is kept once
        assert not {ex["id"] for ex in train} & {ex["id"] for ex in test}
        assert {"nums", "target"} <= train[0].keys()


def test_countdown_parquet(tmp_path):
    pytest.importorskip("datasets")
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = [{"nums": [i, 4], "target": i + 4} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "cd.parquet")
    train, test = _both("countdown", source=str(tmp_path / "cd.parquet"))
    assert sorted(ex["target"] for ex in train + test) == list(range(4, 14))


def test_xlam_jsonl_with_json_strings(tmp_path):
    tools = [{"name": "get_weather", "description": "Weather in a city",
              "parameters": {"city": {"type": "str", "description": "city name"}}}]
    rows = [{"id": i, "query": f"Weather in city {i}?", "tools": json.dumps(tools),
             "answers": json.dumps([{"name": "get_weather", "arguments": {"city": f"c{i}"}}])} for i in range(10)]
    train, test = _both("function_calling", source=_jsonl(tmp_path / "xlam.jsonl", rows))
    ex = (train + test)[0]
    assert len(train) + len(test) == 10 and ex["tools"] == tools and ex["answers"][0]["name"] == "get_weather"
    pytest.importorskip("verifiers")
    assert tasks.verify("function_calling", f"Sure: {json.dumps(ex['answers'])}", ex).correct


def test_math_problem_solution_and_answer_forms(tmp_path):
    rows = [{"problem": f"What is {i} + 1?", "solution": f"We add: $\\boxed{{\\frac{{{i}}}{{1}} + 1}}$."}
            for i in range(5)] + [{"question": "2 + 2?", "answer": "So 4.\n#### 4"}, {"problem": "1+1?", "answer": 2}]
    train, test = _both("math", source=_jsonl(tmp_path / "math.jsonl", rows))
    by_problem = {ex["problem"]: ex for ex in train + test}
    assert by_problem["What is 3 + 1?"]["answer"] == "\\frac{3}{1} + 1"
    assert by_problem["2 + 2?"]["answer"] == "4" and by_problem["1+1?"]["answer"] == "2"


def test_mbpp(tmp_path):
    rows = [{"task_id": i, "text": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
             "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "test_setup_code": ""} for i in range(5)]
    train, test = _both("code", source=_jsonl(tmp_path / "mbpp.jsonl", rows))
    ex = (train + test)[0]
    assert ex["test_list"] and ex["id"] in {str(i) for i in range(5)}
    assert "assert add(1, 2) == 3" in tasks.first_attempt_messages("code", ex)[-1]["content"]
    pytest.importorskip("verifiers")
    assert tasks.verify("code", f"```python\n{ex['canonical_solution']}\n```", ex).correct


# ------------------------------------------------------------------ user mistakes: one clear line
def _error(task="countdown", split="train", **kw):
    with pytest.raises(UsageError) as info:
        tasks.load_examples(task, split, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_malformed_rows_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"nums": [1, 2], "target": 3}\n{"nums": [1, 2]}\n')
    assert f"{path}:2" in _error(source=str(path))
    path.write_text('{"nums": [1, 2], "target": 3}\n\n{"nums": [1, 2], \n')
    assert f"{path}:3" in _error(source=str(path)) and "JSON" in _error(source=str(path))
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"nums": [1], "target": 1}, {"nums": "12", "target": 3}]))
    assert f"{path} item 2" in _error(source=str(path))
    path = tmp_path / "xlam.jsonl"
    path.write_text(json.dumps({"query": "q", "tools": "[not json", "answers": "[]"}) + "\n")
    assert f"{path}:1" in _error("function_calling", source=str(path))
    path = tmp_path / "math.jsonl"
    path.write_text(json.dumps({"problem": "p", "solution": "no box here"}) + "\n")
    assert f"{path}:1" in _error("math", source=str(path))
    path = tmp_path / "mbpp.jsonl"
    path.write_text(json.dumps({"text": "t", "code": "x = 1"}) + "\n")
    assert f"{path}:1" in _error("code", source=str(path))


def test_unknown_names_and_missing_files(tmp_path):
    assert "countdown" in _error("chess")  # lists the valid tasks
    assert "test" in _error(split="validation")
    message = _error(source="nonsense")
    assert "nonsense" in message and "generated" in message and "easy" in message
    assert "unknown countdown source 'math500'" in _error(source="math500")  # a math source, not countdown
    missing = tmp_path / "nope.jsonl"
    assert str(missing) in _error(source=str(missing))
    other = tmp_path / "data.csv"
    other.write_text("nums,target\n")
    assert str(other) in _error(source=str(other))
    assert _error(n=-1)
    with pytest.raises(UsageError):
        tasks.first_attempt_messages("chess", {})


def test_hub_failure_says_to_pass_a_local_file(monkeypatch):
    class OfflineDatasets:
        @staticmethod
        def load_dataset(name, *args, **kwargs):
            raise ConnectionError(f"Couldn't reach '{name}' on the Hub\nmore detail")
    monkeypatch.setattr(datafiles, "_datasets", lambda: OfflineDatasets)
    message = _error(source="someone/Countdown-Tasks-3to4")
    assert "someone/Countdown-Tasks-3to4" in message and "Hub" in message and "local" in message


# ------------------------------------------------------------------ prompts
def _alternates(messages):
    roles = [m["role"] for m in messages]
    assert roles[0] == "system" and roles[-1] == "user"
    assert all(a != b for a, b in zip(roles[1:], roles[2:])) and set(roles[1:]) <= {"user", "assistant"}
    assert all(isinstance(m["content"], str) and m["content"].strip() for m in messages)


@pytest.mark.parametrize("task,source", BUILTIN)
def test_messages_are_well_formed(task, source):
    ex = tasks.load_examples(task, "test", source=source, n=1)[0]
    messages = tasks.first_attempt_messages(task, ex)
    _alternates(messages)
    # the whole R3 conversation: attempt, reflection request, reflection, retry request
    _alternates(messages + [{"role": "assistant", "content": "a wrong attempt"},
                            {"role": "user", "content": tasks.reflect_instruction(task)},
                            {"role": "assistant", "content": "a reflection"},
                            {"role": "user", "content": tasks.retry_instruction(task)}])
    _alternates(messages + [{"role": "assistant", "content": "a first try"},
                            {"role": "user", "content": tasks.correction_instruction(task)}])
    if task == "countdown":
        assert len(messages) == 8 and str(ex["target"]) in messages[-1]["content"]
        assert all("<answer>" in m["content"] for m in messages if m["role"] == "assistant")
        verifiers = pytest.importorskip("verifiers")
        for question, answer in zip(messages[1::2], messages[2::2]):  # the few-shot answers are right
            nums = json.loads(question["content"].split("numbers ")[1].split("]")[0] + "]")
            target = int(question["content"].split("equals ")[1].split(".")[0])
            assert verifiers.countdown(answer["content"], {"nums": nums, "target": target}).correct


@pytest.mark.parametrize("task,source", BUILTIN)
def test_a_retry_with_a_note_is_the_first_try_led_by_the_reflection(task, source):
    """--retry-context reflection: the first try's messages, the question led by the reflection (on one line);
    the failed attempt is nowhere, so there is no answer to copy."""
    ex = tasks.load_examples(task, "test", source=source, n=1)[0]
    first = tasks.first_attempt_messages(task, ex)
    note = tasks.retry_with_note_messages(task, ex, " I used 7\ntwice;  use each once. ")
    _alternates(note)
    assert note[:-1] == first[:-1] and note[-1]["role"] == "user"
    assert note[-1]["content"].endswith("\n\n" + first[-1]["content"])
    assert "I used 7 twice; use each once." in note[-1]["content"].split("\n\n")[0]
    assert len(note) == len(first) and "a wrong attempt" not in str(note)


def test_instructions_name_the_answer_format():
    formats = {"countdown": "<answer>", "function_calling": '"arguments"', "math": "\\boxed{}", "code": "```python"}
    for task, fmt in formats.items():
        assert fmt in tasks.first_attempt_messages(task, tasks.load_examples(task, "test", n=1)[0])[-1]["content"]
        example = tasks.load_examples(task, "test", n=1)[0]
        assert fmt in tasks.retry_instruction(task) and fmt in tasks.correction_instruction(task)
        assert fmt in tasks.retry_instruction(task, example)
        reflect = tasks.reflect_instruction(task)
        assert "one or two sentences" in reflect and "not give the answer" in reflect
        candidate = tasks.reflect_instruction(task, "candidate")  # the same error categories, then an answer
        assert candidate.split("?")[:-1] == reflect.split("?")[:-1]
        assert "corrected answer" in candidate and "not give the answer" not in candidate
    assert "wrong numbers" in tasks.reflect_instruction("countdown")
    assert "wrong tool" in tasks.reflect_instruction("function_calling")
    with pytest.raises(KeyError):
        tasks.reflect_instruction("countdown", "plan")
    assert "error" in tasks.correction_instruction("math")


def test_countdown_prompts_agree_with_the_verifier_and_each_other():
    """The question asks for what the verifier accepts (an expression: '=' is rejected), the system prompt
    does not forbid the reflection's sentences, and the retry restates the question with its numbers."""
    ex = {"nums": [3, 5, 7], "target": 22}
    question = tasks.first_attempt_messages("countdown", ex)[-1]["content"]
    assert "expression that equals 22" in question and "equation" not in question
    assert not verifiers.countdown("<answer> 3 * 5 + 7 = 22 </answer>", ex).correct
    assert verifiers.countdown("<answer> 3 * 5 + 7 </answer>", ex).correct
    assert "Give only" not in tasks.SYSTEM["countdown"].split(".")[0]  # only when answering
    retry = tasks.retry_instruction("countdown", ex)
    assert "[3, 5, 7]" in retry and "22" in retry and question in retry
    assert "different" in tasks.reflect_instruction("countdown")
