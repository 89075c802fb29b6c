"""Tests for verifiers.py: every category of every verifier, hostile inputs (each verdict must
come back within a time bound: a safety check, not a benchmark), and the real BFCL data shipped
in the bfcl-eval wheel. The code verifier's tests are in test_code_verifier.py."""
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import math_equiv  # noqa: E402
from verifiers import VERIFIERS, Verdict, code, countdown, function_call, math  # noqa: E402

MB = 1 << 20
math_equiv.warm_up(wait=True)  # the first symbolic comparison must not wait for the import


def timed(fn, *args, limit=1.0, **kwargs) -> Verdict:
    start = time.perf_counter()
    verdict = fn(*args, **kwargs)
    elapsed = time.perf_counter() - start
    assert elapsed < limit, f"{fn.__name__} took {elapsed:.2f} s"
    assert isinstance(verdict, Verdict)
    assert (verdict.error is None) == verdict.correct
    return verdict


def test_registry():
    assert VERIFIERS == {"countdown": countdown, "function_calling": function_call,
                         "math": math, "code": code}


# ----------------------------------------------------------------------------- countdown

def ans(expr):
    return f"Let me think step by step... <answer>{expr}</answer>"


COUNTDOWN = [
    # (completion, nums, target, expected error or None)
    (ans("(3 + 5) * 3"), [3, 5, 3], 24, None),
    (ans(" 8 / (3 - 8 / 3) "), [8, 3, 8, 3], 24, None),         # exact rationals, not floats
    (ans("3 × 4 − 2 ÷ 1"), [3, 4, 2, 1], 10, None),              # unicode operators
    (ans("((((7))))-2"), [7, 2], 5, None),
    (ans("3+5") + " wait <answer>3*5</answer>", [3, 5], 15, None),  # the last tag counts
    (ans("3*5") + " no: <answer>3+5</answer>", [3, 5], 15, "missed_target"),
    ("the answer is 3+5", [3, 5], 8, "format"),
    ("<answer>3+5", [3, 5], 8, "format"),
    ("3+5</answer>", [3, 5], 8, "format"),
    (ans(""), [3, 5], 8, "invalid_equation"),
    (ans("   "), [3, 5], 8, "invalid_equation"),
    (ans("2**3"), [2, 3], 8, "invalid_equation"),
    (ans("9**9**9"), [9, 9, 9], 8, "invalid_equation"),
    (ans("2^3"), [2, 3], 8, "invalid_equation"),
    (ans("2.5*4"), [2, 5, 4], 10, "invalid_equation"),          # TinyZero would accept this
    (ans(".5*4*5"), [5, 4, 5], 10, "invalid_equation"),
    (ans("3/(5-5)"), [3, 5, 5], 1, "invalid_equation"),
    (ans("3 + x"), [3], 3, "invalid_equation"),
    (ans("__import__('os').system('ls')"), [3], 3, "invalid_equation"),
    (ans("(3 + 5"), [3, 5], 8, "invalid_equation"),
    (ans("3 + 5)"), [3, 5], 8, "invalid_equation"),
    (ans("3 +"), [3], 3, "invalid_equation"),
    (ans("3 5"), [3, 5], 8, "invalid_equation"),
    (ans("()"), [3], 3, "invalid_equation"),
    (ans("-3 + 5"), [3, 5], 2, "invalid_equation"),              # unary minus: not allowed
    (ans("5 - -3"), [3, 5], 8, "invalid_equation"),
    (ans("+3 + 5"), [3, 5], 8, "invalid_equation"),
    (ans("3 + 5 = 8"), [3, 5], 8, "invalid_equation"),
    (ans("3,5 + 1"), [3, 5, 1], 9, "invalid_equation"),
    (ans("25 - 4"), [2, 5, 4], 21, "wrong_numbers"),             # digit concatenation
    (ans("3 + 5"), [3, 5, 3], 8, "wrong_numbers"),               # a number left out
    (ans("3 + 3 + 5"), [3, 5], 11, "wrong_numbers"),             # a number used twice
    (ans("3 + 5"), [3, 5], 9, "missed_target"),
    (ans("7 / 2"), [7, 2], 3, "missed_target"),                  # 7/2 is not truncated to 3
]


@pytest.mark.parametrize("text,nums,target,error", COUNTDOWN)
def test_countdown_table(text, nums, target, error):
    verdict = timed(countdown, text, {"nums": nums, "target": target})
    assert verdict.error == error, verdict
    assert verdict.correct == (error is None)


def test_countdown_messages():
    wrong = countdown(ans("3 * 3"), {"nums": [3, 5], "target": 9})
    assert wrong.message == "used numbers [3, 3] but must use [3, 5] exactly once"
    missed = countdown(ans("(3 + 5) * 2 + 1"), {"nums": [3, 5, 2, 1], "target": 24})
    assert missed.message == "expression equals 17, target is 24"
    assert countdown(ans("7 / 2"), {"nums": [7, 2], "target": 3}).message.startswith(
        "expression equals 7/2")


HOSTILE_COUNTDOWN = [
    ("<answer>" + "(" * 100_000 + "3" + ")" * 100_000 + "</answer>", "invalid_equation"),
    ("<answer>" + "(" * 40 + "3" + ")" * 40 + "</answer>", "invalid_equation"),  # short, deep
    ("<answer>" + "(" * 100_000 + "</answer>", "invalid_equation"),
    ("<answer>" + "3+" * (MB // 2) + "3</answer>", "invalid_equation"),
    ("x" * MB, "format"),
    ("<answer>" * (MB // 8), "format"),
    ("</answer>" * (MB // 9), "format"),
    ("<answer>" + "</answer>" * (MB // 9), "invalid_equation"),
    ("<answer>" + "9" * 999 + "</answer>", "wrong_numbers"),
    ("<answer>" + "*".join(["9"] * 400) + "</answer>", "wrong_numbers"),  # 9**400: cheap
    ("junk " * (MB // 5) + ans("3*5"), None),
]


@pytest.mark.parametrize("text,error", HOSTILE_COUNTDOWN, ids=range(len(HOSTILE_COUNTDOWN)))
def test_countdown_hostile(text, error):
    assert timed(countdown, text, {"nums": [3, 5], "target": 15}).error == error


# ----------------------------------------------------------------------------- function calling

TOOLS = json.dumps([{"name": "get_weather", "parameters": {"city": {"type": "str"}}},
                    {"name": "get_time", "parameters": {"tz": {"type": "str"}}}])
XLAM = {"tools": TOOLS, "answers": json.dumps([
    {"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "metric": True}},
    {"name": "get_time", "arguments": {"tz": "CET"}}])}
WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "metric": true}}'
TIME = '{"name": "get_time", "arguments": {"tz": "CET"}}'


def calls(*items):
    return "[" + ", ".join(items) + "]"


FUNCTION_CALLS = [
    (calls(WEATHER, TIME), None),
    (calls(TIME, WEATHER), None),                                      # order-free
    ("Sure! Here you go:\n```json\n" + calls(WEATHER, TIME) + "\n```\nDone.", None),
    (calls(WEATHER.replace("3", "3.0"), TIME), None),                  # 3 == 3.0
    ("<tool_call>\n" + WEATHER + "\n</tool_call>\n<tool_call>\n" + TIME + "\n</tool_call>", None),
    ("I will call [the tools] now. " + calls(WEATHER, TIME), None),     # brackets in prose
    ("Plan: " + calls(TIME) + " no, both: " + calls(WEATHER, TIME), None),  # the last list counts
    ("I cannot help with that.", "format"),
    ('{"city": "Paris"}', "format"),                                    # JSON, but no call
    (calls(WEATHER, '{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}'), "format"),
    (calls(WEATHER, '{"name": "get_time"}'), "format"),
    (calls(WEATHER, '{"name": 7, "arguments": {}}'), "format"),
    (calls(WEATHER, TIME, "5"), "format"),                              # non-dict item
    (calls(WEATHER, '{"name": "get_time", "arguments": {"tz": "CET"}'), "wrong_tool"),  # cut off:
    # the list does not parse, so only the one complete call object counts
    (calls(WEATHER), "wrong_tool"),
    (calls(WEATHER, TIME, TIME), "wrong_tool"),
    (calls(WEATHER, TIME.replace("get_time", "get_clock")), "wrong_tool"),
    (calls(WEATHER, TIME.replace("CET", "UTC")), "wrong_arguments"),
    (calls(WEATHER.replace("3", '"3"'), TIME), "wrong_arguments"),     # "3" != 3
    (calls(WEATHER.replace("true", "1"), TIME), "wrong_arguments"),    # 1 != true
    (calls(WEATHER.replace(', "metric": true', ""), TIME), "wrong_arguments"),
    (calls(WEATHER, TIME.replace('"CET"', '"CET", "dst": false')), "wrong_arguments"),
    (calls(WEATHER.replace('"city"', '"town"'), TIME), "wrong_arguments"),
]


@pytest.mark.parametrize("text,error", FUNCTION_CALLS, ids=range(len(FUNCTION_CALLS)))
def test_function_call_table(text, error):
    assert timed(function_call, text, XLAM).error == error


def test_function_call_forms_and_messages():
    one = {"answers": [{"name": "f", "arguments": {"x": [1, {"y": 2.0}]}}]}  # already parsed
    assert function_call('{"name": "f", "arguments": {"x": [1, {"y": 2}]}}', one).correct
    assert function_call('[{"name": "f", "arguments": {"x": [{"y": 2}, 1]}}]', one).error == \
        "wrong_arguments"
    # messages say what is wrong, never the gold answer (Re-ReST's reflector reads them as feedback)
    assert function_call(calls(WEATHER), XLAM).message == \
        "called ['get_weather']: not the 2 tool call(s) this request needs"
    wrong_tz = function_call(calls(WEATHER, TIME.replace("CET", "UTC")), XLAM).message
    assert wrong_tz == "get_time: argument 'tz' = \"UTC\" is not a correct value" and "CET" not in wrong_tz
    twice = {"answers": [{"name": "f", "arguments": {"x": 1}},
                         {"name": "f", "arguments": {"x": 2}}]}
    assert function_call('[{"name": "f", "arguments": {"x": 2}}, '
                         '{"name": "f", "arguments": {"x": 1}}]', twice).correct
    same = function_call('[{"name": "f", "arguments": {"x": 1}}, '
                         '{"name": "f", "arguments": {"x": 1}}]', twice)
    assert same.error == "wrong_arguments" and "'x' = 1" in same.message


BFCL = {"ground_truth": [{"search": {"query": ["cats", "kittens"], "limit": ["", 10],
                                     "filter": [{"lang": ["en"], "safe": ["", True]}],
                                     "rows": [[{"id": [1]}, {"id": [2, 3]}]]}}]}
BFCL_CASES = [
    ('[{"name": "search", "arguments": {"query": "cats", "filter": {"lang": "en"}, '
     '"rows": [{"id": 1}, {"id": 3}]}}]', None),
    ('[{"name": "search", "arguments": {"query": "kittens", "limit": 10.0, '
     '"filter": {"lang": "en", "safe": true}, "rows": [{"id": 1}, {"id": 2}]}}]', None),
    ('[{"name": "search", "arguments": {"query": "dogs", "filter": {"lang": "en"}, '
     '"rows": [{"id": 1}, {"id": 3}]}}]', "wrong_arguments"),
    ('[{"name": "search", "arguments": {"query": "cats", "limit": 5, "filter": {"lang": "en"}, '
     '"rows": [{"id": 1}, {"id": 3}]}}]', "wrong_arguments"),
    ('[{"name": "search", "arguments": {"query": "cats", "filter": {"lang": "de"}, '
     '"rows": [{"id": 1}, {"id": 3}]}}]', "wrong_arguments"),
    ('[{"name": "search", "arguments": {"query": "cats", "filter": {}, '
     '"rows": [{"id": 1}, {"id": 3}]}}]', "wrong_arguments"),
    ('[{"name": "search", "arguments": {"query": "cats", "filter": {"lang": "en"}, '
     '"rows": [{"id": 3}, {"id": 1}]}}]', "wrong_arguments"),
    ('[{"name": "search", "arguments": {"filter": {"lang": "en"}, '
     '"rows": [{"id": 1}, {"id": 3}]}}]', "wrong_arguments"),
    ('[{"name": "find", "arguments": {}}]', "wrong_tool"),
]


@pytest.mark.parametrize("text,error", BFCL_CASES, ids=range(len(BFCL_CASES)))
def test_function_call_bfcl_form(text, error):
    assert timed(function_call, text, BFCL).error == error


# A BFCL row with its tool schema ("function"), as tasks._bfcl builds it ("tools").
SCHEMA_TOOLS = [{"name": "book", "parameters": {"type": "dict", "required": ["city", "nights"], "properties": {
    "city": {"type": "string"}, "nights": {"type": "integer"}, "budget": {"type": "float"},
    "pets": {"type": "boolean"}, "rooms": {"type": "array", "items": {"type": "integer"}},
    "tags": {"type": "array", "items": {"type": "string"}}, "extra": {"type": "dict"},
    "hotel": {"type": "string"}, "floor": {"type": "integer"}}}}]
SCHEMA_ROW = {"tools": SCHEMA_TOOLS, "category": "simple_python", "ground_truth": [{"book": {
    "city": ["New York", "NYC"], "nights": [3], "budget": ["", 200.0], "pets": ["", False],
    "rooms": ["", [1, 2]], "tags": ["", []], "extra": ["", {"view": ["sea"]}],
    "hotel": ["", None], "floor": ["", "top_floor"]}}]}


def book(**args):
    return json.dumps([{"name": "book", "arguments": {"city": "New York", "nights": 3, **args}}])


SCHEMA_CASES = [
    # (completion, expected error or None): BFCL's rules on types, strings and the schema
    (book(), None),
    (book(nights=3.0), "wrong_arguments"),                   # a float is not an integer
    (book(nights="3"), "wrong_arguments"),
    (book(nights=True), "wrong_arguments"),                  # nor is a bool
    (book(budget=200), None),                                # an int is a float
    (book(budget=200.0), None),
    (book(budget="200"), "wrong_arguments"),
    (book(pets=0), "wrong_arguments"),
    (book(pets=False), None),
    (book(city="new york"), None),                           # case,
    (book(city="NewYork"), None),                            # spaces
    (book(city="new-york."), None),                          # and ,./-_*^ are ignored
    (book(city="n.y.c"), None),
    (book(city="Newark"), "wrong_arguments"),
    (book(city="New York!"), "wrong_arguments"),             # other punctuation counts
    (book(rooms=[1, 2]), None),
    (book(rooms=[1.0, 2]), "wrong_arguments"),               # list items are typed too
    (book(rooms=[2, 1]), "wrong_arguments"),
    (book(extra={"view": "Sea"}), None),                     # strings in dicts: BFCL's rules
    (book(extra={"view": "sea", "bar": 1}), "wrong_arguments"),
    (book(hotel=None), None),                                # the gold's own type passes
    (book(floor="top_floor"), None),                         # a variable name for an integer
    (book(floor=3), "wrong_arguments"),
    (book(tags=[]), None),
    (book(rooms=[]), "wrong_arguments"),                     # [] is a value, not an omission
    (book(wifi=True), "wrong_arguments"),                    # the tool has no such argument
    (json.dumps([{"name": "book", "arguments": {"city": "NYC"}}]), "wrong_arguments"),  # required
]


@pytest.mark.parametrize("text,error", SCHEMA_CASES, ids=range(len(SCHEMA_CASES)))
def test_function_call_bfcl_schema_rules(text, error):
    assert timed(function_call, text, SCHEMA_ROW).error == error


def test_function_call_schema_messages_and_other_forms():
    assert "expected integer, got float" in function_call(book(nights=3.0), SCHEMA_ROW).message
    assert "no argument 'wifi'" in function_call(book(wifi=1), SCHEMA_ROW).message
    assert "missing required argument 'nights'" in function_call(
        json.dumps([{"name": "book", "arguments": {"city": "NYC"}}]), SCHEMA_ROW).message
    raw = {"function": SCHEMA_TOOLS, "ground_truth": SCHEMA_ROW["ground_truth"]}  # BFCL's key
    assert function_call(book(nights=3.0), raw).error == "wrong_arguments"
    # xlam rows with OpenAI/JSON-Schema tools get the same checks; flat xlam tools do not
    openai = {"tools": json.dumps([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer"}, "x": {"type": "number"}},
        "required": ["n"]}}}]), "answers": [{"name": "f", "arguments": {"n": 2, "x": 1.0}}]}
    assert function_call('[{"name": "f", "arguments": {"n": 2, "x": 1}}]', openai).correct
    assert function_call('[{"name": "f", "arguments": {"n": 2.0, "x": 1}}]', openai).error == \
        "wrong_arguments"
    assert function_call(calls(WEATHER.replace("3", "3.0"), TIME), XLAM).correct  # no types


def test_function_call_pairs_parallel_calls_in_any_order():
    """BFCL pairs greedily: gold 1 takes the first call it fits, and gold 2 may then find none.
    Ours finds a pairing whenever one exists."""
    row = {"ground_truth": [{"f": {"x": [1, 2]}}, {"f": {"x": [1]}}]}
    assert function_call('[{"name": "f", "arguments": {"x": 1}}, '
                         '{"name": "f", "arguments": {"x": 2}}]', row).correct
    assert function_call('[{"name": "f", "arguments": {"x": 2}}, '
                         '{"name": "f", "arguments": {"x": 2}}]', row).error == "wrong_arguments"


HOSTILE_CALLS = [
    "[" * 40_000 + "]" * 40_000,                                # too deep for json: RecursionError
    '{"a":' * 30_000 + "1" + "}" * 30_000,
    "[" * MB,                                                   # megabyte inputs
    calls(*[WEATHER] * 20_000),
    '[{"name": "get_time", "arguments": {"tz": ' + "9" * 90_000 + "}}]",  # int too long for json
    "{[" * 40_000,
    "[] " * 30_000,
    "[{" * 20_000 + '"name": "x"',
    '[{"name": "get_time", "arguments": {"tz": ' + "[" * 990 + "]" * 990 + "}}]",  # deep values
    '[{"name": "get_time", "arguments": ' + "[" * 990 + "]" * 990 + "}]",          # in messages
]


@pytest.mark.parametrize("text", HOSTILE_CALLS, ids=range(len(HOSTILE_CALLS)))
def test_function_call_hostile(text):
    assert not timed(function_call, text, XLAM).correct


# ----------------------------------------------------------------------------- math

MATH = [
    # (completion, gold answer, expected error or None)
    (r"so the answer is \boxed{42}.", "42", None),
    (r"\boxed{42}", 42, None),
    (r"\boxed{\frac{1}{2}}", "0.5", None),
    (r"\boxed{\dfrac12}", "1/2", None),
    (r"\boxed{.5}", r"\frac{1}{2}", None),
    (r"\boxed{-\tfrac{3}{4}}", "-0.75", None),
    (r"\boxed{3.0}", "3", None),
    (r"$\boxed{\frac{\sqrt{6}}{4}}$", r"$\frac{\sqrt{6}}{4}$", None),  # nested braces
    (r"\boxed{\frac{\sqrt6}{4}}", r"\frac{\sqrt{6}}{4}", None),
    (r"\fbox{7}", "7", None),
    (r"\boxed{1} then \boxed{2}", "2", None),                        # the last box counts
    (r"\boxed{10\text{ cm}}", "10", None),
    (r"\boxed{10 \mbox{ cm}^2}", "10", None),
    (r"\boxed{\text{Monday}}", "Monday", None),
    (r"\boxed{90^\circ}", "90", None),
    (r"\boxed{50\%}", "50", None),
    (r"\boxed{1,000}", "1000", None),
    (r"\boxed{\$1,234.50}", "1234.5", None),
    (r"\boxed{(1, 2)}", "(1,2)", None),
    (r"\boxed{x = 5}", "5", None),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)", None),
    (r"\boxed{3\!\sqrt{2}}", r"3\sqrt{2}", None),
    (r"\boxed 5", "5", None),
    ("The final answer is $3\\sqrt{2}$. I hope it is correct.", r"3\sqrt{2}", None),
    ("The answer is 42.", "42", None),
    ("Therefore, the answer is: 1,000", "1000", None),
    ("The final answer is **18**.", "18", None),
    ("She started with 18.\n#### 18", "18", None),
    ("#### 18", "Half of 10 is 5, so 5 + 13 = <<5+13=18>>18\n#### 18", None),  # GSM8K gold
    (r"\boxed{41}", "42", "wrong_answer"),
    (r"\boxed{2}", r"\frac{1}{2}", "wrong_answer"),
    (r"\boxed{(1,2)}", "12", "wrong_answer"),
    (r"\boxed{1,2}", "12", "wrong_answer"),
    ("The answer is 7", "8", "wrong_answer"),
    (r"\boxed{1e999999999}", "1", "wrong_answer"),                  # no exponent blow-up
    (r"\boxed{1/0}", "1", "wrong_answer"),
    ("I don't know.", "42", "format"),
    (r"\boxed{}", "42", "format"),
    (r"\boxed{42", "42", "format"),
]


@pytest.mark.parametrize("text,gold,error", MATH, ids=range(len(MATH)))
def test_math_table(text, gold, error):
    assert timed(math, text, {"answer": gold}).error == error


HOSTILE_MATH = [
    ("\\boxed{" + "{" * MB, "format"),
    ("\\boxed{" * (MB // 7), "format"),
    ("the answer is " * (MB // 14), "format"),
    ("the answer is 1" * (MB // 15) + " the answer is 42", None),
    ("\\boxed{" + "7" * 5000 + "}", "format"),                    # too long to be an answer
    ("The answer is " + "7" * 5000, "wrong_answer"),
    ("x" * MB + "\\boxed{42}", None),
    ("#### " * (MB // 5), "format"),
]


@pytest.mark.parametrize("text,error", HOSTILE_MATH, ids=range(len(HOSTILE_MATH)))
def test_math_hostile(text, error):
    assert timed(math, text, {"answer": "42"}).error == error


MATH_FORMS = [
    # (answer, gold, correct?): forms math-verify accepts, and wrong answers next to them
    (r"1{,}940", "1940", True),
    (r"1{,}941", "1940", False),
    (r"\sqrt{49}", "7", True),
    (r"\sqrt{50}", "7", False),
    (r"\frac{14}{2}", "7", True),
    (r"\sqrt{2}/2", r"\frac{\sqrt2}{2}", True),
    (r"\frac{1}{\sqrt{2}}", r"\frac{\sqrt{2}}{2}", True),
    (r"\sqrt{3}/2", r"\frac{\sqrt2}{2}", False),
    (r"\sqrt{12}", r"2\sqrt{3}", True),
    (r"\pi/2", r"\frac{\pi}{2}", True),
    (r"\frac{1}{2}\pi", r"\frac{\pi}{2}", True),
    (r"\pi", "3.14159", False),
    (r"4-\pi", r"-\pi+4", True),
    ("3, -2", "-2, 3", True),                                    # unordered solution lists
    ("x=3, x=-2", "-2,3", True),
    ("x=3, y=-2", "y=3, x=-2", False),                           # names stay with values
    ("y=-2, x=3", "x=3, y=-2", True),
    ("3, 2", "-2, 3", False),
    ("1, 2, 2", "1, 2", False),
    (r"\{3,1,2\}", r"\{1,2,3\}", True),                          # sets
    (r"\{1,2\}", r"\{1,2,3\}", False),
    (r"(3,\infty)\cup(-\infty,2)", r"(-\infty,2)\cup(3,\infty)", True),  # unions
    (r"(-\infty,2]\cup(3,\infty)", r"(-\infty,2)\cup(3,\infty)", False),
    ("[1, 5)", "[1,5)", True),                                   # intervals
    ("(1,5)", "[1,5)", False),
    (r"\left(1, 2\right)", "(1,2)", True),                       # ordered pairs
    ("(2,1)", "(1,2)", False),
    (r"\{1,2\}", "(1,2)", False),                                # math-verify accepts this one
    ("(1,2)", r"\{1,2\}", False),
    ("1, 2", "(1,2)", False),
    (r"\text{monday}", "Monday", True),                          # text
    (r"\textbf{Monday}", r"\text{Monday}", True),
    (r"\text{Tuesday}", "Monday", False),
    (r"yadnoM", "Monday", False),                                # letters are not a product
    ("ab", "AB", False),                                         # a segment is not a word
    (r"\text{(C)}", "C", True),                                  # choice letters
    ("(C)", r"\text{(C)}", True),
    ("B", r"\text{(C)}", False),
    ("c", "C", False),
    (r"3.5\times10^{4}", "35000", True),                         # scientific notation
    (r"3.5 \cdot 10^4", "35000", True),
    (r"1.2\times10^{-3}", "0.0012", True),
    (r"3.5\times10^{3}", "35000", False),
    ("(x+1)^2", "x^2+2x+1", True),                               # polynomials
    ("x(x-1)(x+1)", "x^3-x", True),
    ("(2x-3)(3x+2)", "6x^2-5x-6", True),
    ("(x-1)^2", "x^2+2x+1", False),
    ("x^2+1", "x^2+2x+1", False),
    (r"2\frac{1}{2}", "1", False),                               # a mixed number: not guessed
    ("0.333333", r"\frac{1}{3}", False),                         # no rounding
]


@pytest.mark.parametrize("answer,gold,correct", MATH_FORMS, ids=range(len(MATH_FORMS)))
def test_math_forms(answer, gold, correct):
    assert timed(math, f"So the answer is $\\boxed{{{answer}}}$.", {"answer": gold}).correct == correct


HUGE_POWERS = [r"10^{10^{10}}", r"2^{99999999}", r"9^{9^{9^{9}}}", r"\sqrt{10^{10^{10}}}",
               r"x^{999999}-x^{999999}", r"(x+y+z)^{64}", r"2^{64}\cdot" * 40 + "1",
               r"\sqrt{" + "9" * 40 + "}", "(" * 300 + "1" + ")" * 300, "-" * 900 + "1",
               r"\frac{1}{0}", r"0^{-1}", r"\sqrt[99999]{2}", r"(-\infty,\infty)-\infty"]


@pytest.mark.parametrize("answer", HUGE_POWERS, ids=range(len(HUGE_POWERS)))
def test_math_hostile_powers_fail_closed_in_time(answer):
    assert not timed(math, f"\\boxed{{{answer}}}", {"answer": "1"}).correct
    assert not timed(math, r"\boxed{1}", {"answer": answer}).correct


def test_math_in_threads_and_without_sympy(monkeypatch):
    """The time limit works off the main thread (no signals); without sympy, answers that need
    it fail closed while exact rationals still work."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda case: math(rf"\boxed{{{case[0]}}}", {"answer": case[1]}).correct,
                                [(a, g) for a, g, _ in MATH_FORMS]))
    assert results == [correct for _, _, correct in MATH_FORMS]
    monkeypatch.setitem(sys.modules, "sympy", None)  # import sympy now raises ImportError
    assert not math(r"\boxed{\sqrt{49}}", {"answer": "7"}).correct
    assert math(r"\boxed{\frac{14}{2}}", {"answer": "7"}).correct


MALFORMED_EXAMPLES = [{}, {"nums": "x", "target": None}, {"nums": [1], "target": "a"},
                      {"answer": None}, {"answer": ["x"]}, {"ground_truth": 5},
                      {"ground_truth": [{"f": 3}]}, {"answers": "[{"}, {"answers": [5]},
                      {"tools": {"a": 1}, "answers": []}, {"prompt": 1, "entry_point": 3},
                      {"test_list": [1, None]}, {"test_list": "assert True"}]
COMPLETIONS = ["<answer>1</answer>", r"\boxed{1}", '[{"name": "f", "arguments": {"x": 1}}]',
               "def f():\n    pass\n", ""]


@pytest.mark.parametrize("task", sorted(VERIFIERS))
def test_verifiers_never_raise_on_malformed_examples(task):
    for example in MALFORMED_EXAMPLES:
        for text in COMPLETIONS:
            verdict = timed(VERIFIERS[task], text, example, limit=7.0)
            assert not verdict.correct, (example, text)
    assert VERIFIERS[task](None, {}).error == "invalid_example"


# ----------------------------------------------------------------------------- real data

BFCL_CATEGORIES = ["simple_python", "multiple", "parallel", "parallel_multiple", "live_simple",
                   "live_multiple", "live_parallel", "live_parallel_multiple", "simple_java",
                   "simple_javascript"]


def bfcl_ground_truth(category):
    bfcl_eval = pytest.importorskip("bfcl_eval")
    path = Path(bfcl_eval.__file__).parent / "data" / "possible_answer" / f"BFCL_v4_{category}.json"
    if not path.exists():
        pytest.skip(f"{path.name} is not in this bfcl-eval version")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def first_choice(option):
    """A concrete value from a BFCL option: dicts map keys to their own allowed lists."""
    if isinstance(option, dict):
        return {key: first_choice(allowed[0]) if isinstance(allowed, list) and allowed else allowed
                for key, allowed in option.items()
                if not (isinstance(allowed, list) and allowed[:1] == [""])}
    if isinstance(option, list):
        return [first_choice(item) for item in option]
    return option


def gold_calls(row):
    return [{"name": name, "arguments": {arg: first_choice(allowed[0]) if allowed else []
                                         for arg, allowed in spec.items() if allowed[:1] != [""]}}
            for entry in row["ground_truth"] for name, spec in entry.items()]


@pytest.mark.parametrize("category", BFCL_CATEGORIES)
def test_bfcl_ground_truth_is_correct_and_perturbations_are_not(category):
    rows, perturbed = bfcl_ground_truth(category), 0
    for row in rows:
        calls_ = gold_calls(row)
        assert function_call(json.dumps(calls_), row).correct, row["id"]
        renamed = [dict(calls_[0], name=calls_[0]["name"] + "_v2")] + calls_[1:]
        assert function_call(json.dumps(renamed), row).error == "wrong_tool", row["id"]
        assert function_call(json.dumps(calls_[1:]), row).error == "wrong_tool", row["id"]
        spec = next(iter(row["ground_truth"][0].values()))
        required = [arg for arg, allowed in spec.items() if "" not in allowed]
        if required:
            perturbed += 1
            changed = json.loads(json.dumps(calls_))
            changed[0]["arguments"][required[0]] = "__not_an_allowed_value__"
            assert function_call(json.dumps(changed), row).error == "wrong_arguments", row["id"]
            del changed[0]["arguments"][required[0]]
            assert function_call(json.dumps(changed), row).error == "wrong_arguments", row["id"]
    assert perturbed > len(rows) // 2


def test_bfcl_completion_forms():
    row = bfcl_ground_truth("parallel")[0]
    calls_ = gold_calls(row)
    fenced = "Calling the tools.\n```json\n" + json.dumps(calls_[::-1], indent=2) + "\n```"
    assert function_call(fenced, row).correct
    as_xlam = {"answers": json.dumps(calls_)}
    assert function_call(json.dumps(calls_), as_xlam).correct
