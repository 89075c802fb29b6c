"""Verifiers: one pure function per task, `(completion_text, example) -> Verdict`.

Every reward in the project comes from here, so these are strict, exact and safe on hostile
input: no eval, exact rational arithmetic, capped input sizes, regexes that cannot backtrack
badly, and model-written code runs only in a separate, resource-limited process (see `code`).
No verifier raises: whatever the input, the answer is a Verdict (see _never_raises).
Standard library only; the math verifier uses sympy (math_equiv.py) when it is installed, as it
is with torch, the code sandbox lives in sandbox.py, and the function-call checks in tool_calls.py.
"""
import functools
import json
import re
import time
from dataclasses import dataclass
from fractions import Fraction

import math_equiv
import sandbox
import tool_calls
from tool_calls import clip


@dataclass(frozen=True)
class Verdict:
    correct: bool
    error: str | None = None  # category; None when correct
    message: str = ""         # human-readable feedback (environment feedback for Re-ReST)


def _fail(error: str, message: str) -> Verdict:
    return Verdict(False, error, message)


def _never_raises(verifier):
    """A verifier's answer is a Verdict, whatever the input: a malformed example (a missing or
    mistyped field) or an input we did not foresee fails closed instead of raising."""
    @functools.wraps(verifier)
    def safe(text, example, *args, **kwargs):
        try:
            if not isinstance(text, str) or not isinstance(example, dict):
                raise TypeError("the completion must be a str and the example a dict")
            return verifier(text, example, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 -- the point is to catch everything
            return _fail("invalid_example", f"cannot judge: {type(e).__name__}: {clip(str(e))}")
    return safe


# ----------------------------------------------------------------------------- countdown

MAX_EXPR_CHARS = 1000   # a real answer is a few dozen characters; longer is not an answer
MAX_PAREN_DEPTH = 32    # keeps the recursive-descent parser far from Python's recursion limit
_UNICODE_OPS = {"×": "*", "÷": "/", "−": "-"}
_TOKEN = re.compile(r"[0-9]*\.[0-9]*|[0-9]+|\*\*|\S")  # decimals are caught to be rejected


class _Invalid(Exception):
    """The expression is not a legal Countdown equation (message says why)."""


def _last_tag(text: str, open_tag: str, close_tag: str) -> str | None:
    # rfind, not a regex, so megabyte completions cost one linear scan
    end = text.rfind(close_tag)
    start = text.rfind(open_tag, 0, end) if end >= 0 else -1
    return None if start < 0 else text[start + len(open_tag):end]


def _tokenize(expr: str) -> list:
    tokens = []
    for token in _TOKEN.findall(expr):
        token = _UNICODE_OPS.get(token, token)
        if "." in token:
            raise _Invalid("decimal numbers are not allowed; use the given integers")
        if token in ("**", "^"):
            raise _Invalid("exponentiation is not allowed; use only + - * /")
        if token == "=":
            raise _Invalid("write only the expression, without '='")
        if token[0] in "0123456789":
            tokens.append(int(token))
        elif token in "+-*/()":
            tokens.append(token)
        else:
            raise _Invalid(f"illegal character {token!r}; use only integers, + - * / and ( )")
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)* ; term := factor (('*'|'/') factor)* ;
    factor := INTEGER | '(' expr ')'. Evaluates with Fractions and records the numbers used.
    Unary minus/plus is rejected: the game combines the given numbers with binary operations."""

    def __init__(self, tokens):
        self.tokens, self.pos, self.numbers = tokens, 0, []

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self):
        token = self.peek()
        self.pos += 1
        return token

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op, rhs = self.take(), self.term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self.peek() in ("*", "/"):
            op, rhs = self.take(), self.factor(depth)
            if op == "/" and rhs == 0:
                raise _Invalid("division by zero")
            value = value * rhs if op == "*" else value / rhs
        return value

    def factor(self, depth: int) -> Fraction:
        token = self.take()
        if isinstance(token, int):
            self.numbers.append(token)
            return Fraction(token)
        if token == "(":
            if depth >= MAX_PAREN_DEPTH:
                raise _Invalid("parentheses nested too deeply")
            value = self.expr(depth + 1)
            if self.take() != ")":
                raise _Invalid("unbalanced parentheses")
            return value
        if token in ("+", "-"):
            raise _Invalid(f"unary {token!r} is not allowed; combine the numbers as given")
        if token is None:
            raise _Invalid("expression ends too early")
        raise _Invalid(f"unexpected {token!r}")


def _evaluate(expr: str) -> tuple[list[int], Fraction]:
    """A whole expression's numbers (sorted) and exact value; _Invalid if it is not a legal equation."""
    parser = _Parser(_tokenize(expr))
    value = parser.expr(0)
    if parser.peek() is not None:
        raise _Invalid(f"unexpected {parser.peek()!r}")
    return sorted(parser.numbers), value


@_never_raises
def countdown(text: str, example: dict) -> Verdict:
    """Last <answer>...</answer> must use every number in example["nums"] exactly once and
    equal example["target"] exactly."""
    body = _last_tag(text, "<answer>", "</answer>")
    if body is None:
        return _fail("format", "no <answer> ... </answer> tag found")
    expr = body.strip()
    if not expr:
        return _fail("invalid_equation", "the answer tag is empty")
    if len(expr) > MAX_EXPR_CHARS:
        return _fail("invalid_equation", f"expression longer than {MAX_EXPR_CHARS} characters")
    try:
        used, value = _evaluate(expr)
    except _Invalid as e:
        return _fail("invalid_equation", str(e))
    nums, target = sorted(int(n) for n in example["nums"]), Fraction(example["target"])
    if used != nums:
        return _fail("wrong_numbers", f"used numbers {used} but must use {nums} exactly once")
    if value != target:
        return _fail("missed_target", f"expression equals {value}, target is {target}")
    return Verdict(True)


# ----------------------------------------------------------------------------- function calling

@_never_raises
def function_call(text: str, example: dict) -> Verdict:
    """Calls must equal the gold calls as a multiset: same names, same argument names and values.
    Gold is xlam form (example["answers"]: [{name, arguments}]) or BFCL form
    (example["ground_truth"]: [{name: {arg: [allowed values]}}]). Where the example carries the
    tools with a JSON-Schema-style parameter object ("tools" or BFCL's "function"), arguments are
    also checked against it as BFCL does: no unknown ones, every required one, and their types
    (a float is not an integer). BFCL-form strings compare as BFCL's do (case, spaces and
    ,./-_*^ ignored). Two places where we keep our own rule over BFCL's checker: parallel calls
    may come in any order (BFCL's greedy pairing misses some), and [] is a value, not the
    omission of an optional list argument."""
    calls = tool_calls.model_calls(text)
    if isinstance(calls, str):
        return _fail("format", calls)
    bfcl, gold = tool_calls.gold_calls(example)  # a malformed example raises: _never_raises fails it
    schemas = tool_calls.schemas(example)
    names, gold_names = sorted(n for n, _ in calls), sorted(n for n, _ in gold)
    if names != gold_names:  # multisets of tool names differ
        return _fail("wrong_tool", f"called {names}: not the {len(gold_names)} tool call(s) this request needs")
    fits = [[tool_calls.call_problem(name, args, g_name, g_args, schemas, bfcl) is None
             for g_name, g_args in gold] for name, args in calls]
    if tool_calls.perfect_matching(fits):
        return Verdict(True)
    for j, (g_name, g_args) in enumerate(gold):  # report the first gold call nobody fits
        if not any(row[j] for row in fits):
            args = next(args for name, args in calls if name == g_name)
            problem = tool_calls.call_problem(g_name, args, g_name, g_args, schemas, bfcl)
            return _fail("wrong_arguments", f"{g_name}: {problem}")
    return _fail("wrong_arguments", "the calls do not match the expected arguments one-to-one")


# ----------------------------------------------------------------------------- math

MAX_ANSWER_CHARS = 1000
_ANSWER_TAIL = 10_000  # answer sentences are looked for only this far from the end
_ANSWER_SENTENCE = re.compile(r"(?:final answer|the answer)\s*(?:is|:|=)\s*:?(?=([^\n]*))", re.I)
_GSM8K_ANSWER = re.compile(r"####(?=([^\n]*))")
_TEXT_GROUP = re.compile(r"\\(?:textbf|textit|text|mbox|mathrm|mathbf|textrm)\s*\{([^{}]*)\}(?:\^\{?\d\}?)?")
_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)")
_FRAC = re.compile(r"(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}")
_LATEX_NOISE = [("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
                ("\\displaystyle", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""),
                ("^{\\circ}", ""), ("^\\circ", ""), ("\\circ", ""), ("°", ""), ("\\%", ""),
                ("%", ""), ("\\$", ""), ("$", "")]


def _last_boxed(text: str) -> str | None:
    end = len(text)
    for _ in range(5):  # a few tries: the last \boxed may be cut off
        start = max(text.rfind("\\boxed", 0, end), text.rfind("\\fbox", 0, end))
        if start < 0:
            return None
        i = start + (6 if text.startswith("\\boxed", start) else 5)
        while i < len(text) and text[i] == " ":
            i += 1
        if text[i:i + 1] != "{":  # "\boxed 5": up to the next space or $
            return re.match(r"[^\s$]*", text[i:i + MAX_ANSWER_CHARS]).group() or None
        depth = 0  # an answer longer than MAX_ANSWER_CHARS is no answer: scan no further
        for j in range(i, min(len(text), i + MAX_ANSWER_CHARS + 2)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + 1:j]
        end = start
    return None


def _final_answer(text: str) -> str | None:
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    tail = text[-_ANSWER_TAIL:]
    for pattern in (_GSM8K_ANSWER, _ANSWER_SENTENCE):
        matches = list(pattern.finditer(tail))
        if matches:
            found = matches[-1].group(1).strip()
            math_span = re.search(r"\$([^$]+)\$", found)
            return math_span.group(1) if math_span else re.split(r"\.\s", found)[0]
    return None


def _normalize(answer: str) -> str:
    dropped = _TEXT_GROUP.sub("", answer)  # units after a value go; a text-only answer stays
    answer = dropped if dropped.strip() else _TEXT_GROUP.sub(r"\1", answer)
    for old, new in _LATEX_NOISE:
        answer = answer.replace(old, new)
    answer = re.sub(r"^\*+|[*.]+$", "", "".join(answer.split()))  # markdown bold, final period
    answer = answer.replace("{,}", ",")  # 1{,}940: LaTeX's way to keep a thousands comma tight
    answer = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", answer)
    answer = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", answer)
    if answer.count("=") == 1 and re.match(r"[A-Za-z]\w*=", answer):  # "x=5" -> "5"
        answer = answer.split("=")[1]
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", answer):  # "1,000" but not "(1,2)"
        answer = answer.replace(",", "")
    return answer


def _as_number(answer: str) -> Fraction | None:
    # own regexes, not Fraction(str): "1e999999999" would make Fraction compute 10**999999999
    try:
        if _NUMBER.fullmatch(answer):
            return Fraction(answer)
        if m := re.fullmatch(r"(-?\d+)/(-?\d+)", answer):
            return Fraction(int(m[1]), int(m[2]))
        if m := _FRAC.fullmatch(answer):
            return (-1 if m[1] else 1) * Fraction(m[2]) / Fraction(m[3])
    except (ValueError, ZeroDivisionError):
        pass
    return None


@_never_raises
def math(text: str, example: dict) -> Verdict:
    """Final answer (last \\boxed{}, else "#### x", else "the (final) answer is x") must equal
    example["answer"] after LaTeX normalisation, or as a number."""
    start = time.monotonic()
    math_equiv.warm_up()  # starts loading sympy in the background, once
    found = _final_answer(text)
    if found is None or not found.strip():
        return _fail("format", "no final answer found (put it in \\boxed{...})")
    gold = str(example["answer"])
    gold = gold.rsplit("####", 1)[-1] if "####" in gold else gold  # a full GSM8K solution
    if len(found) > MAX_ANSWER_CHARS:
        return _fail("wrong_answer", f"final answer longer than {MAX_ANSWER_CHARS} characters")
    ours, theirs = _normalize(found), _normalize(gold)
    if ours == theirs:
        return Verdict(True)
    a, b = _as_number(ours), _as_number(theirs)
    if a is not None and a == b:
        return Verdict(True)
    if math_equiv.equal(ours, theirs, seconds=0.8 - (time.monotonic() - start)):
        return Verdict(True)
    return _fail("wrong_answer", f"final answer {clip(found.strip())} is not correct")


# ----------------------------------------------------------------------------- code

MAX_PROGRAM_CHARS = 100_000
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)```", re.S)  # disjoint classes: no blow-up

def _extract_program(text: str) -> str:
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    python = [body for lang, body in blocks if lang in ("python", "py", "python3")]
    if python or blocks:
        return (python or [body for _, body in blocks])[-1]
    if "```" in text:  # an unclosed fence: the generation was cut off inside it
        return text.rsplit("```", 1)[1].partition("\n")[2]
    return text


@_never_raises
def code(text: str, example: dict, timeout: float = 5.0, memory: int = 1 << 30) -> Verdict:
    """Run the program and the example's tests in a sandboxed child process (sandbox.py).

    HumanEval form: {"prompt", "test", "entry_point"}; the prompt (imports, helpers, signature)
    always goes first, so the completion may be the function body or the whole function (a
    full redefinition replaces the prompt's stub). MBPP form: {"test_list", optional
    "test_setup_code", "test_imports"}. Correct only if the tests run to their end.

    Threat model: the program is untrusted and runs in the same process as the trusted tests.
    Caught: early exit (exit(), sys.exit, os._exit, before or during tests); printing fake
    success (the harness wants a random per-run nonce on stdout plus exit code 0; the parent
    puts the nonce in a pipe that the runner reads only after the tests, so no frame or object
    holds it while the program runs); tampering with builtins (undone before the tests);
    patching or replacing modules the tests use (math.fabs, a fake module in sys.modules: the
    tests' imports are loaded first, every module is restored before the tests, and a function
    patched during the tests fails the run); redefining the prompt's helpers that the tests
    call (HumanEval/32 poly, /38 encode_cyclic: the tests get them rebuilt from the prompt);
    tracers that skip asserts (sys.settrace is disabled); returned objects of program-defined
    classes that override __eq__ and friends; forks (RLIMIT_NPROC=0 and the session is killed);
    sleeps (timeout, then SIGKILL to the process group); memory (RLIMIT_AS); huge files
    (RLIMIT_FSIZE); writes outside the temp work dir through open, io/_io, os.open, os.mkdir
    and the destructive os/shutil functions. As root, the child runs as `nobody` (with the
    system Python of the same version when `nobody` cannot run ours); then the OS enforces the
    file limits too. The child gets a minimal environment (no API keys).
    Not defended: a program that reads the nonce's pipe itself (its fd is inherited) or the
    parent's memory when it runs as the caller; calling libc through ctypes (open, fork as
    root, setsid); patching a class's methods (collections.Counter.__eq__) or a module
    function during one call and restoring it in the next; OS-level damage when it runs as
    the caller (not root, or root with no Python `nobody` can run). Use a container or VM
    for untrusted code at scale.
    """
    if len(text) > 2 * MAX_PROGRAM_CHARS:
        return _fail("format", "completion too long")
    program = _extract_program(text)
    if not program.strip():
        return _fail("format", "no code found")
    if len(program) > MAX_PROGRAM_CHARS:
        return _fail("format", f"program longer than {MAX_PROGRAM_CHARS} characters")
    if "test_list" in example:
        tests = "\n".join([*example.get("test_imports", []), example.get("test_setup_code", ""),
                           *example["test_list"]])
        trusted, entry_point = "", ""
    else:
        trusted, entry_point = example.get("prompt", ""), example["entry_point"]
        program = trusted + "\n" + program
        tests = f"{example['test']}\n\ncheck({entry_point})\n"
    outcome, message = sandbox.run(program, tests, trusted, entry_point, timeout, memory)
    if outcome == "passed":
        return Verdict(True)
    if outcome in ("exited", "failed"):
        return _fail("wrong_answer", message)
    return _fail("timeout" if outcome == "timeout" else "runtime_error", message)


VERIFIERS = {"countdown": countdown, "function_calling": function_call, "math": math, "code": code}


# ----------------------------------------------------------------------------- repeated answers

_BARE_EXPR = re.compile(r"[0-9][0-9\s()+\-*/×÷−]*[0-9)]")  # a run of integers and operators, for reflections


def answer_key(task: str, text: str, loose: bool = False):
    """What a reply answers, reduced so that equivalent answers are equal: countdown, the numbers the
    expression uses and its value (so "3 + 2" and "(2 + 3)" are one answer); math, the normalised final
    answer; function calling, the calls; code, the program's non-blank lines. None: no answer in it.
    loose (countdown): without an <answer> tag, the last bare expression with an operator, as a
    reflection may name a candidate ("try 6 - 1 * 5")."""
    try:
        if task == "countdown":
            body = _last_tag(text, "<answer>", "</answer>")
            if body is None and loose:
                body = next((m for m in reversed(_BARE_EXPR.findall(text[-MAX_EXPR_CHARS:]))
                             if any(op in m for op in "+-*/×÷−")), None)
            if body is None or not body.strip() or len(body) > MAX_EXPR_CHARS:
                return None
            try:
                used, value = _evaluate(body)
                return tuple(used), value
            except _Invalid:
                return "".join(body.split())  # not an equation: equal only to the same characters
        if task == "math":
            found = _final_answer(text)
            return None if found is None or not found.strip() else _normalize(found)
        if task == "function_calling":
            calls = tool_calls.model_calls(text)
            return None if isinstance(calls, str) else \
                sorted(json.dumps([name, args], sort_keys=True, default=repr) for name, args in calls)
        program = _extract_program(text)
        return "\n".join(line.rstrip() for line in program.splitlines() if line.strip()) or None
    except Exception:  # noqa: BLE001 -- a key is a hint for the reward; an unreadable answer has none
        return None


def same_answer(task: str, retry: str, attempt: str) -> bool:
    """Does the retry give the failed attempt's answer again, word for word or in an equivalent form
    (--repeat-reward: a retry that changes nothing earns that instead of the verifier's credit)?
    Two replies with no answer are the same only as the same text."""
    if retry.strip() == attempt.strip():
        return True
    key = answer_key(task, retry)
    if key is None:
        return False
    other = answer_key(task, attempt)
    if key == other:
        return True
    if task == "math":  # "1/2" and "0.5": the math verifier's own equivalence
        a, b = _as_number(key), _as_number(other or "")
        return (a is not None and a == b) or (other is not None and math_equiv.equal(key, other, seconds=0.2))
    return False
