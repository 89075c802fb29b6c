"""Are two normalised math answers equal? The comparison behind verifiers.math.

    equal("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}")  -> True
    equal("\\{1,2\\}", "(1,2)")                  -> False  (a set is not an ordered pair)

Answers are split into structure first: sets (any order), tuples and intervals (in order, same
brackets), unions of intervals (any order) and bare lists of solutions (any order). Each leaf
is then compared as text, as an exact rational, or, when it has roots, pi or variables, with
sympy on an expression tree we build ourselves (no sympify, no eval). Anything we cannot parse
or judge in time counts as different: a wrong "equal" is worse than a missed one.

Safety: inputs are short (MAX_CHARS), integer literals have at most MAX_DIGITS digits, an
exponent must be a plain number no larger than MAX_EXPONENT and powers do not nest, so sympy
never meets 10^{10^{10}}. On top of that, the sympy step runs in a worker thread that the
caller waits for at most `seconds`; if it is late the answer is "different" (works in any
thread, unlike signal-based timeouts). sympy is imported lazily, in the background from the
first call (warm_up); a comparison that comes while it still loads may run out of time and
count as different. Without sympy only the exact-rational comparison is made.
"""
import re
import threading
import time
from fractions import Fraction

MAX_CHARS = 300
MAX_DIGITS = 40
MAX_EXPONENT = 64
MAX_ITEMS = 32
MAX_SYMBOLIC_EXPONENT = 16  # (x+y+z)^{64} would expand to thousands of terms
_STUCK: list[threading.Thread] = []  # sympy workers that outlived their deadline

_TOKEN = re.compile(r"\\(?:frac|sqrt|pi|cdot|times|div|infty)|\\[A-Za-z]+|\d+\.?\d*|\.\d+"
                    r"|[A-Za-z]+|\S")
_WORDS = re.compile(r"[A-Za-z][A-Za-z ']*[A-Za-z]")


class _Unparsable(Exception):
    pass


# ----------------------------------------------------------------------------- structure

def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split at separators outside any (), [], {} (intervals mix their brackets)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        c = text[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            start = i + len(sep)
            i = start
            continue
        i += 1
    return parts + [text[start:]]


def _balanced(text: str) -> bool:
    depth = 0
    for c in text:
        depth += (c in "([{") - (c in ")]}")
        if depth < 0:
            return False
    return depth == 0


def _structure(text: str):
    """("set", items) | ("bracket", "(]", items) | ("union", parts) | ("list", items) | None."""
    if text.startswith("\\{") and text.endswith("\\}") and _balanced(text[2:-2]):
        return "set", [t for t in _split_top(text[2:-2]) if t]
    if len(union := _split_top(text, "\\cup")) > 1:
        return "union", union
    if text[:1] in "([" and text[-1:] in ")]" and _balanced(text[1:-1]):
        items = _split_top(text[1:-1])
        if len(items) > 1:
            return "bracket", text[0] + text[-1], items
    items = _split_top(text)
    if len(items) > 1:  # "x=1, x=2": a list of solutions, named or not; "x=1, y=2" keeps
        names = {re.match(r"[A-Za-z]=", item) and item[0] for item in items}  # its names
        if len(names) == 1 and None not in names:
            items = [item[2:] for item in items]
        return "list", items
    return None


def _same_multiset(xs: list[str], ys: list[str], deadline: float) -> bool:
    if len(xs) != len(ys) or len(xs) > MAX_ITEMS:
        return False
    left = list(ys)
    for x in xs:
        match = next((i for i, y in enumerate(left) if _same(x, y, deadline)), None)
        if match is None:
            return False
        left.pop(match)
    return True


def _same(a: str, b: str, deadline: float) -> bool:
    if a == b:
        return True
    sa, sb = _structure(a), _structure(b)
    if sa or sb:
        if not (sa and sb) or sa[0] != sb[0]:
            return False  # a set never equals a tuple, an interval never equals a list
        if sa[0] == "bracket":
            return sa[1] == sb[1] and len(sa[2]) == len(sb[2]) and \
                all(_same(x, y, deadline) for x, y in zip(sa[2], sb[2]))
        return _same_multiset(sa[-1], sb[-1], deadline)
    return _same_leaf(a, b, deadline)


# ----------------------------------------------------------------------------- leaves

def _same_leaf(a: str, b: str, deadline: float) -> bool:
    choice_a, choice_b = _choice(a), _choice(b)
    if choice_a or choice_b:
        return choice_a == choice_b
    if _WORDS.fullmatch(a) and _WORDS.fullmatch(b):  # "Monday" and \text{monday}; not "AB"
        return len(a) > 2 and a.casefold() == b.casefold()  # and "ab", which may be a segment
    try:
        x, y = _Parser(a).parse(), _Parser(b).parse()
    except (_Unparsable, RecursionError, ValueError, ZeroDivisionError, OverflowError):
        return False
    fx, fy = _rational(x), _rational(y)
    if fx is not None and fy is not None:
        return fx == fy
    return _sympy_equal(x, y, deadline - time.monotonic())


def _choice(text: str) -> str | None:
    """A multiple-choice letter: "C", "(C)", "C)"."""
    m = re.fullmatch(r"\(?([A-E])\)?", text)
    return m[1] if m and (text == m[1] or text.endswith(")")) else None


class _Parser:
    """expr := term (('+'|'-') term)* ; term := unary (('*'|'/'|implicit) unary)* ;
    unary := ('-'|'+') unary | power ; power := atom ('^' exponent)? ;
    atom := number | letter | \\pi | \\infty | (expr) | {expr} | \\frac{}{} | \\sqrt[n]{}.
    Builds tuples: ("num", Fraction), ("sym", name), ("pi",), ("inf",), ("add", a, b),
    ("mul", a, b), ("div", a, b), ("neg", a), ("pow", base, Fraction), ("root", a, n)."""

    def __init__(self, text: str):
        if len(text) > MAX_CHARS:
            raise _Unparsable("too long")
        self.tokens, self.pos = _TOKEN.findall(text), 0

    def parse(self):
        tree = self.expr()
        if self.pos != len(self.tokens):
            raise _Unparsable(f"unexpected {self.tokens[self.pos]!r}")
        return tree

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self):
        token = self.peek()
        self.pos += 1
        return token

    def expect(self, token):
        if self.take() != token:
            raise _Unparsable(f"expected {token!r}")

    def expr(self):
        tree = self.term()
        while self.peek() in ("+", "-"):
            op, rhs = self.take(), self.term()
            tree = ("add", tree, rhs if op == "+" else ("neg", rhs))
        return tree

    def term(self):
        tree = self.unary()
        while True:
            token = self.peek()
            if token in ("*", "\\cdot", "\\times", "/", "\\div"):
                self.take()
                rhs = self.unary()
                tree = ("div", tree, rhs) if token in ("/", "\\div") else ("mul", tree, rhs)
            elif token is not None and (token[0].isalpha() or token in
                                        ("(", "{", "\\frac", "\\sqrt", "\\pi")):
                if tree[0] == "num" and token == "\\frac" and self.plain_fraction_follows():
                    raise _Unparsable("a mixed number like 2\\frac{1}{2} is ambiguous")
                tree = ("mul", tree, self.power())  # implicit: 2\pi, 3x, (x+1)(x-1)
            else:
                return tree

    def plain_fraction_follows(self):
        return re.fullmatch(r"\\frac\{\d+\}\{\d+\}.*", "".join(self.tokens[self.pos:])) is not None

    def unary(self):
        if self.peek() in ("-", "+"):
            sign = self.take()
            operand = self.unary()
            return ("neg", operand) if sign == "-" else operand
        return self.power()

    def power(self):
        base = self.atom()
        if self.peek() != "^":
            return base
        self.take()
        if self.peek() is not None and len(self.peek()) > 1 and self.peek()[0].isdigit():
            raise _Unparsable("x^23 is x^2 3 in LaTeX: ambiguous")
        exponent = _rational(self.group() if self.peek() == "{" else self.atom())
        if exponent is None or abs(exponent) > MAX_EXPONENT or exponent.denominator > MAX_EXPONENT:
            raise _Unparsable("exponent must be a small number")
        if _has_pow(base):
            raise _Unparsable("nested powers")
        if _has_symbol(base) and abs(exponent) > MAX_SYMBOLIC_EXPONENT:
            raise _Unparsable("exponent too large for a polynomial")
        if self.peek() == "^":
            raise _Unparsable("nested powers")
        return ("pow", base, exponent)

    def group(self):
        self.expect("{")
        tree = self.expr()
        self.expect("}")
        return tree

    def atom(self):
        token = self.take()
        if token is None:
            raise _Unparsable("ends too early")
        if token[0].isdigit() or token[0] == ".":
            if len(token) > MAX_DIGITS:
                raise _Unparsable("number too long")
            return ("num", Fraction(token))
        if token.isalpha():
            if len(token) > 1:  # "ab" may be a word, not a*b: do not guess
                raise _Unparsable("several letters")
            return ("sym", token)
        if token == "\\pi":
            return ("pi",)
        if token == "\\infty":
            return ("inf",)
        if token in ("(", "{"):
            tree = self.expr()
            self.expect(")" if token == "(" else "}")
            return tree
        if token == "\\frac":
            return ("div", self.group(), self.group())
        if token == "\\sqrt":
            n = 2
            if self.peek() == "[":
                self.take()
                n = _rational(self.expr())
                self.expect("]")
                if n is None or n.denominator != 1 or not 2 <= n <= MAX_EXPONENT:
                    raise _Unparsable("root index must be a small integer")
            return ("root", self.group() if self.peek() == "{" else self.atom(), int(n))
        raise _Unparsable(f"unexpected {token!r}")


def _has_pow(tree) -> bool:
    return tree[0] == "pow" or any(isinstance(t, tuple) and _has_pow(t) for t in tree[1:])


def _has_symbol(tree) -> bool:
    return tree[0] == "sym" or any(isinstance(t, tuple) and _has_symbol(t) for t in tree[1:])


def _rational(tree) -> Fraction | None:
    """Exact value of a tree of numbers and + - * / and integer powers; None otherwise."""
    kind = tree[0]
    if kind == "num":
        return tree[1]
    if kind == "neg":
        value = _rational(tree[1])
        return None if value is None else -value
    if kind in ("add", "mul", "div"):
        x, y = _rational(tree[1]), _rational(tree[2])
        if x is None or y is None or (kind == "div" and y == 0):
            return None
        return x + y if kind == "add" else x * y if kind == "mul" else x / y
    if kind == "pow" and tree[2].denominator == 1:
        base = _rational(tree[1])
        if base is None or (base == 0 and tree[2] < 0):
            return None
        return base ** int(tree[2])
    return None


# ----------------------------------------------------------------------------- sympy

def _to_sympy(tree, sympy):
    kind = tree[0]
    if kind == "num":
        return sympy.Rational(tree[1].numerator, tree[1].denominator)
    if kind == "sym":
        return sympy.Symbol(tree[1])
    if kind == "pi":
        return sympy.pi
    if kind == "inf":
        return sympy.oo
    if kind == "neg":
        return -_to_sympy(tree[1], sympy)
    if kind == "root":
        return sympy.root(_to_sympy(tree[1], sympy), tree[2])
    x = _to_sympy(tree[1], sympy)
    if kind == "pow":
        return x ** sympy.Rational(tree[2].numerator, tree[2].denominator)
    y = _to_sympy(tree[2], sympy)
    return x + y if kind == "add" else x * y if kind == "mul" else x / y


def _sympy_zero(x, y) -> bool:
    try:
        import sympy
    except ImportError:
        return False
    difference = _to_sympy(x, sympy) - _to_sympy(y, sympy)
    if difference.has(sympy.nan, sympy.zoo) or difference.has(sympy.oo):
        return False  # oo - oo and 1/0 are not "equal"; equal infinities matched as text
    # a quick look first: at a few exact points, 30 digits tell most differences at once
    symbols = sorted(difference.free_symbols, key=str)
    for point in ([], [3, 7, 11, 13], [-5, 2, 17, 19]) if symbols else ([],):
        at = difference.subs({s: sympy.Rational(p, 7) for s, p in zip(symbols, point)})
        value = at.evalf(30) if not at.free_symbols else None
        if value is not None and value.is_number and value.is_zero is False and abs(value) > 1e-20:
            return False
    for simplify in (lambda d: d, sympy.expand, sympy.cancel, sympy.radsimp, sympy.simplify):
        if simplify(difference) == 0:
            return True
    return False


_warming: list[threading.Thread] = []


def warm_up(wait: bool = False) -> None:
    """Import sympy in the background (once), so that the first comparison that needs it is not
    spent importing it (about 0.5 s); wait=True blocks until it is loaded."""
    if not _warming:
        def load():
            try:
                import sympy  # noqa: F401
            except ImportError:
                pass
        _warming.append(threading.Thread(target=load, daemon=True, name="math_equiv_import"))
        _warming[0].start()
    if wait:
        _warming[0].join()


def _sympy_equal(x, y, seconds: float) -> bool:
    """sympy's verdict if it comes within `seconds`; False if late, failing or unavailable."""
    _STUCK[:] = [t for t in _STUCK if t.is_alive()]
    if seconds <= 0 or len(_STUCK) >= 2:  # earlier comparisons still burn CPU: do not pile up more
        return False
    result = []

    def work():
        try:
            result.append(_sympy_zero(x, y))
        except Exception:  # sympy raising on odd input is "cannot tell": different
            result.append(False)
    worker = threading.Thread(target=work, daemon=True, name="math_equiv")
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        _STUCK.append(worker)
        return False
    return bool(result and result[0])


def equal(a: str, b: str, seconds: float = 0.8) -> bool:
    """Are the normalised answers a and b the same value (or the same set, tuple, ...)?
    Decided within about `seconds`; what is not decided by then counts as different."""
    if len(a) > MAX_CHARS or len(b) > MAX_CHARS:
        return a == b
    try:
        return _same(a, b, time.monotonic() + seconds)
    except RecursionError:
        return False
