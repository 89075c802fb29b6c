"""--repeat-reward: a failed retry that repeats the failed attempt's answer (verifiers.same_answer)
earns the given reward instead of the verifier's partial credit. Tables of (attempt, retry) pairs."""
import pytest

import loop
import tasks
import verifiers
from verifiers import Verdict

EX = {"nums": [2, 3, 3], "target": 8}  # solved by 3 + 3 + 2

SAME = [  # (task, retry, attempt): the same answer, as text or in an equivalent form
    ("countdown", "<answer> 2 + 3 </answer>", "<answer> 2 + 3 </answer>"),              # word for word
    ("countdown", "<answer>3+2</answer>", "<answer> 2 + 3 </answer>"),                  # spaces, order
    ("countdown", "Sure. <answer> (2 + 3) </answer>", "<answer> 2 + 3 </answer>"),     # brackets, chatter
    ("countdown", "<answer> 3 * 2 + 3 </answer>", "<answer> 3 + 2 * 3 </answer>"),      # same numbers, same value
    ("countdown", "<answer> 2 × 3 </answer>", "<answer> 2 * 3 </answer>"),              # unicode operator
    ("countdown", "<answer> 2 + x </answer>", "<answer>2 +x</answer>"),                 # not an equation: as text
    ("countdown", "  no idea ", "no idea"),                                              # no answer, same text
    ("math", "so \\boxed{1/2}", "The answer is \\boxed{0.5}"),                         # equal numbers
    ("math", "\\boxed{\\frac{1}{2}}", "\\boxed{1/2}"),
    ("function_calling", '[{"name": "f", "arguments": {"b": 2, "a": 1}}]',
     'Calling: [{"name": "f", "arguments": {"a": 1, "b": 2}}]'),                       # argument order
    ("code", "```python\ndef f():\n    return 1\n```", "def f():\n\n    return 1   \n"),  # blank lines, spaces
]
DIFFERENT = [
    ("countdown", "<answer> 2 * 3 </answer>", "<answer> 2 + 3 </answer>"),              # another value
    ("countdown", "<answer> 3 + 3 + 2 </answer>", "<answer> 2 + 3 </answer>"),          # other numbers
    ("countdown", "<answer> 6 - 1 </answer>", "<answer> 2 + 3 </answer>"),              # same value, other numbers
    ("countdown", "I give up", "<answer> 2 + 3 </answer>"),                              # no answer at all
    ("countdown", "", "<answer> 2 + 3 </answer>"),
    ("countdown", "<answer></answer>", "<answer> 2 + 3 </answer>"),                     # an empty tag
    ("countdown", "<answer> 2 + 3 </answer>", "no idea"),                                # the attempt had none
    ("countdown", "<answer> " + "1+" * 600 + "1 </answer>", "<answer> 2 + 3 </answer>"),  # hostile: too long
    ("countdown", "<answer> " + "(" * 100 + "2 </answer>", "<answer> " + "(" * 99 + "2 </answer>"),  # hostile
    ("math", "\\boxed{3}", "\\boxed{4}"),
    ("math", "no answer here", "\\boxed{4}"),
    ("function_calling", '[{"name": "f", "arguments": {"a": 2}}]', '[{"name": "f", "arguments": {"a": 1}}]'),
    ("function_calling", "not json", '[{"name": "f", "arguments": {"a": 1}}]'),
    ("code", "def f():\n    return 2\n", "def f():\n    return 1\n"),
]


@pytest.mark.parametrize("task, retry, attempt", SAME)
def test_a_repeat_or_an_equivalent_rewrite_is_the_same_answer(task, retry, attempt):
    assert verifiers.same_answer(task, retry, attempt)


@pytest.mark.parametrize("task, retry, attempt", DIFFERENT)
def test_a_changed_answer_is_not_the_same(task, retry, attempt):
    assert not verifiers.same_answer(task, retry, attempt)


@pytest.mark.parametrize("text", [None, 3, b"<answer> 1 </answer>", "\x00" * 10, "<answer>" * 1000])
def test_hostile_inputs_never_raise(text):
    for task in tasks.TASK_NAMES:
        assert verifiers.same_answer(task, text if isinstance(text, str) else "x", "<answer> 1 </answer>") in (True, False)
        assert verifiers.answer_key(task, text) is None or isinstance(text, str)


def test_a_reflection_may_name_a_candidate_without_the_tag():
    assert verifiers.answer_key("countdown", "Try 3 + 3 + 2 next.", loose=True) == ((2, 3, 3), 8)
    assert verifiers.answer_key("countdown", "Try 3 + 3 + 2 next.") is None  # a retry needs the tag
    assert verifiers.answer_key("countdown", "I used the numbers 2, 3 and 3.", loose=True) is None  # no operator


# (attempt, retry, --reward, --repeat-reward) -> the retry's reward. The attempt failed (R3 retries only those).
REWARDS = [
    ("<answer> 2 + 3 </answer>", "<answer> 2 + 3 </answer>", "partial", None, 0.25),   # the paper's reward: a copy keeps its credit
    ("<answer> 2 + 3 </answer>", "<answer> 2 + 3 </answer>", "partial", 0.0, 0.0),     # a repeat earns nothing
    ("<answer> 2 + 3 </answer>", "<answer> 3 + 2 </answer>", "partial", 0.0, 0.0),     # an equivalent rewrite too
    ("<answer> 2 + 3 </answer>", "<answer> 3 + 2 </answer>", "partial", -0.5, -0.5),   # or less
    ("<answer> 2 + 3 </answer>", "<answer> 2 * 3 </answer>", "partial", 0.0, 0.25),    # a change keeps its credit
    ("<answer> 2 * 3 * 3 </answer>", "<answer> 3 * 3 - 2 </answer>", "partial", 0.0, 0.5),  # missed_target, changed
    ("<answer> 2 * 3 * 3 </answer>", "<answer> 3 * 2 * 3 </answer>", "partial", 0.0, 0.0),  # missed_target, repeated
    ("<answer> 2 + 3 </answer>", "<answer> 3 + 3 + 2 </answer>", "partial", 0.0, 1.0),  # a fix
    ("<answer> 2 + 3 </answer>", "<answer> 3 + 3 + 2 </answer>", "binary", -0.5, 1.0),
    ("<answer> 2 + 3 </answer>", "no tag", "partial", 0.0, 0.0),                        # format error: 0 either way
    ("<answer> 2 + 3 </answer>", "<answer> 2 + 3 </answer>", "binary", None, 0.0),     # binary: a copy earns 0
    ("<answer> 2 + 3 </answer>", "<answer> 2 + 3 </answer>", "binary", -0.5, -0.5),
]


@pytest.mark.parametrize("attempt, retry, kind, repeat_reward, want", REWARDS)
def test_retry_reward_table(attempt, retry, kind, repeat_reward, want):
    assert not tasks.verify("countdown", attempt, EX).correct
    repeated = verifiers.same_answer("countdown", retry, attempt)
    assert loop.retry_reward(tasks.verify("countdown", retry, EX), repeated, kind, repeat_reward) == want


def test_a_pass_is_never_a_repeat_penalty():
    # a retry that passes earns 1 even if it were flagged as a repeat (e.g. the attempt was judged wrong
    # for another reason): the penalty is for failing the same way again
    assert loop.retry_reward(Verdict(True), True, "partial", -1.0) == 1.0


# --retry-reward progress: (attempt, retry, --reward) -> max(0, r(retry) - r(attempt)). The attempt failed.
PROGRESS = [
    ("<answer> 2 + 3 </answer>", "<answer> 2 + 3 </answer>", "partial", 0.0),       # a repeat: no gain
    ("<answer> 2 + 3 </answer>", "<answer> 3 + 2 </answer>", "partial", 0.0),       # an equivalent rewrite
    ("<answer> 2 + 3 </answer>", "<answer> 2 * 3 </answer>", "partial", 0.0),       # changed, fails the same way
    ("<answer> 2 + 3 </answer>", "<answer> 2 * 3 + 3 </answer>", "partial", 0.25),  # wrong_numbers -> missed_target
    ("<answer> 2 * 3 * 3 </answer>", "<answer> 2 + 3 </answer>", "partial", 0.0),   # missed_target -> wrong_numbers
    ("<answer> 2 * 3 * 3 </answer>", "no tag", "partial", 0.0),                     # a format error: worse, 0
    ("<answer> 2 * 3 * 3 </answer>", "<answer> 3 + 3 + 2 </answer>", "partial", 0.5),  # a fix: 1 - 0.5
    ("no tag", "<answer> 3 + 3 + 2 </answer>", "partial", 1.0),                     # a fix after a format error
    ("no tag", "<answer> 2 * 3 * 3 </answer>", "partial", 0.5),
    ("<answer> 2 * 3 * 3 </answer>", "<answer> 3 + 3 + 2 </answer>", "binary", 1.0),  # binary: the verifier's
    ("<answer> 2 * 3 * 3 </answer>", "<answer> 2 * 3 * 3 </answer>", "binary", 0.0),
    ("<answer> 2 + (3 </answer>", "<answer> 3 * 3 - 2 </answer>", "partial", 0.4),  # invalid_equation -> missed_target
]


def test_progress_with_a_repeat_penalty_pays_the_penalty_for_a_repeat():
    before = tasks.verify("countdown", "<answer> 2 * 3 * 3 </answer>", EX)
    repeat = tasks.verify("countdown", "<answer> 3 * 2 * 3 </answer>", EX)
    assert loop.retry_reward(repeat, True, "partial", -0.5, before, "progress") == -0.5
    assert loop.retry_reward(Verdict(True), True, "partial", -0.5, before, "progress") == 0.5  # a pass is progress


# --retry-reward no-worse: (attempt, retry, --reward, --repeat-reward) -> the retry's reward, or 0 if it is below
# the attempt's. The attempt failed.
NO_WORSE = [
    ("<answer> 2 * 3 * 3 </answer>", "<answer> 3 * 3 - 2 </answer>", "partial", 0.0, 0.5),  # a new near miss keeps 0.5
    ("<answer> 2 * 3 * 3 </answer>", "<answer> 3 * 2 * 3 </answer>", "partial", 0.0, 0.0),  # an equivalent rewrite
    ("<answer> 2 * 3 * 3 </answer>", "<answer> 2 * 3 * 3 </answer>", "partial", 0.0, 0.0),  # a repeat, word for word
    ("<answer> 2 * 3 * 3 </answer>", "<answer> 2 * 3 * 3 </answer>", "partial", None, 0.5),  # no repeat penalty: its 0.5
    ("<answer> 2 * 3 * 3 </answer>", "<answer> 2 + 3 </answer>", "partial", 0.0, 0.0),      # near miss -> wrong numbers
    ("<answer> 2 * 3 * 3 </answer>", "<answer> 2 * 3 * 4 </answer>", "partial", 0.0, 0.0),  # a number made up: 0, not 0.25
    ("<answer> 2 * 3 * 3 </answer>", "no tag", "partial", 0.0, 0.0),                        # a format error
    ("<answer> 2 * 3 * 3 </answer>", "<answer> 3 + 3 + 2 </answer>", "partial", 0.0, 1.0),  # a fix
    ("<answer> 2 + 3 </answer>", "<answer> 2 * 3 </answer>", "partial", 0.0, 0.25),         # wrong numbers again, changed
    ("<answer> 2 + 3 </answer>", "<answer> 2 * 3 + 3 </answer>", "partial", 0.0, 0.5),      # wrong numbers -> near miss
    ("no tag", "<answer> 2 + 3 </answer>", "partial", 0.0, 0.25),                           # anything beats no answer
    ("<answer> 2 * 3 * 3 </answer>", "<answer> 3 + 3 + 2 </answer>", "binary", 0.0, 1.0),   # binary: the verifier's
    ("<answer> 2 * 3 * 3 </answer>", "<answer> 3 * 3 - 2 </answer>", "binary", None, 0.0),
]


@pytest.mark.parametrize("rule, attempt, retry, kind, repeat_reward, want",
                         [("progress", a, r, k, None, w) for a, r, k, w in PROGRESS] +
                         [("no-worse", *row) for row in NO_WORSE])
def test_retry_rule_tables(rule, attempt, retry, kind, repeat_reward, want):
    """--retry-reward progress and no-worse: each retry against its own failed attempt's verdict."""
    before = tasks.verify("countdown", attempt, EX)
    assert not before.correct
    got = loop.retry_reward(tasks.verify("countdown", retry, EX), verifiers.same_answer("countdown", retry, attempt),
                            kind, repeat_reward, before, rule)
    assert got == pytest.approx(want)


def test_the_three_retry_rules_differ_on_a_new_near_miss():
    # after a missed_target attempt, a different missed_target retry: the verifier's 0.5, no gain (0), not worse (0.5)
    before = tasks.verify("countdown", "<answer> 2 * 3 * 3 </answer>", EX)
    retry = tasks.verify("countdown", "<answer> 3 * 3 - 2 </answer>", EX)
    got = [loop.retry_reward(retry, False, "partial", 0.0, before, rule) for rule in ("verifier", "progress", "no-worse")]
    assert got == [0.5, 0.0, 0.5]
    broke = tasks.verify("countdown", "<answer> 2 + 3 </answer>", EX)  # and one that breaks the numbers rule
    assert [loop.retry_reward(broke, False, "partial", 0.0, before, r) for r in ("verifier", "progress", "no-worse")] \
        == [0.25, 0.0, 0.0]
