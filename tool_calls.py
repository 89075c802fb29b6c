"""Function calling, the parts behind verifiers.function_call: finding the calls in a completion,
reading the gold calls (xlam or BFCL form) and the tool schemas, and what is wrong with one call's
arguments, by BFCL's rules (types, a float is not an integer; strings ignore case, spaces and
,./-_*^; no unknown argument, every required one). Messages say what is wrong, never the answer."""
import json
import re


def clip(text: str, limit: int = 200) -> str:
    """Text for a message: at most limit characters."""
    return text if len(text) <= limit else text[:limit] + "..."


def show(value) -> str:
    try:
        return clip(json.dumps(value))
    except (RecursionError, ValueError):  # absurdly nested model output
        return "<unprintable value>"


MAX_CALL_CHARS = 100_000
_JSON_START = re.compile(r"[\[{]")


def _json_values(text: str, max_failures: int = 32) -> list:
    """Top-level JSON values found in free text, in order (prose and code fences are skipped)."""
    decoder, values, pos, failures = json.JSONDecoder(), [], 0, 0
    while failures < max_failures and (m := _JSON_START.search(text, pos)):
        try:
            value, pos = decoder.raw_decode(text, m.start())
            values.append(value)
        except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
            failures, pos = failures + 1, m.start() + 1
    return values


def _looks_like_calls(value) -> bool:
    items = value if isinstance(value, list) else [value]
    return all(isinstance(item, dict) and "name" in item for item in items)


def model_calls(text: str):
    """The last JSON call list in the completion, or an error message string."""
    if len(text) > MAX_CALL_CHARS:
        return f"completion longer than {MAX_CALL_CHARS} characters"
    values = [v for v in _json_values(text) if _looks_like_calls(v)]
    if not values:
        return 'no JSON list of {"name": ..., "arguments": {...}} calls found'
    if "<tool_call>" in text:  # Hermes/Qwen style, one call per tag: every tagged call counts
        calls = [call for v in values for call in (v if isinstance(v, list) else [v])]
    else:  # otherwise the last call list (or single call object) is the answer; a stray []
        last = [v for v in values if v != []][-1:] or values[-1:]  # in prose does not count
        calls = last[0] if isinstance(last[0], list) else last
    for call in calls:
        if not isinstance(call["name"], str) or not isinstance(call.get("arguments"), dict):
            return f"call {show(call)} needs a string name and an arguments object"
    return [(call["name"], call["arguments"]) for call in calls]


def _maybe_json(value):
    return json.loads(value) if isinstance(value, str) else value


# BFCL forgives differences of case, spacing and a few punctuation marks in strings ("April 1,
# 2024" == "april 1 2024") and treats ' and " alike; these are its rules, in our own code.
_STRING_NOISE = str.maketrans("", "", " ,./-_*^")


def _loose(text: str) -> str:
    return text.translate(_STRING_NOISE).lower().replace("'", '"')


def _equal(a, b, loose: bool = False) -> bool:
    """JSON equality where 3 == 3.0 but True != 1 and "3" != 3; `loose` compares strings the
    way BFCL does."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k], loose) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y, loose) for x, y in zip(a, b))
    if loose and isinstance(a, str) and isinstance(b, str):
        return _loose(a) == _loose(b)
    return type(a) is type(b) and a == b


def _fits_option(value, option) -> bool:
    # BFCL nests: a dict option maps each key to its own list of allowed values (a bare value
    # means just that value); a list option is matched item by item.
    if isinstance(option, dict) and isinstance(value, dict):
        spec = {k: v if isinstance(v, list) else [v] for k, v in option.items()}
        return _argument_problem(value, spec, bfcl=True) is None
    if isinstance(option, list) and isinstance(value, list):
        return len(option) == len(value) and all(map(_fits_option, value, option))
    return _equal(value, option, loose=True)


def _argument_problem(args: dict, gold: dict, bfcl: bool) -> str | None:
    """Why `args` differs from the gold arguments; None when they match. In BFCL form each gold
    argument lists its allowed values, and "" among them means it may be left out."""
    for key in args:
        if key not in gold:
            return f"unexpected argument {key!r}"
    for key, want in gold.items():
        if bfcl and want == []:  # BFCL writes the value [] as [] instead of [[]] (live_simple_106)
            want = [[]]
        if key not in args:
            if bfcl and "" in want:
                continue
            return f"missing argument {key!r}"
        # The message says what is wrong, never what is right: it is feedback (Re-ReST's reflector
        # reads it), and an environment does not hand out the answer.
        if bfcl and not any(_fits_option(args[key], option) for option in want):
            return f"argument {key!r} = {show(args[key])} is not a correct value"
        if not bfcl and not _equal(args[key], want):
            return f"argument {key!r} = {show(args[key])} is not a correct value"
    return None


# Schema types (BFCL's names and JSON Schema's) -> does a value have that type. As in BFCL, an
# int passes for a float (Python widens it) but a float never passes for an integer, and bool
# is not a number. Array items are checked one level deep, without the int -> float widening.
_TYPES = {"string": (str,), "any": (str,), "integer": (int,), "float": (float,),
          "number": (float,), "boolean": (bool,), "array": (list,), "tuple": (list,),
          "dict": (dict,), "object": (dict,)}


def _has_type(value, kind: str, top: bool) -> bool:
    if top and kind in ("float", "number") and type(value) is int:
        return True
    return type(value) in _TYPES[kind]


_NONE_GIVEN = object()  # not None: a gold value may be null


def _first_given(options) -> object:
    given = (o for o in options if o != "") if isinstance(options, list) else ()
    return next(given, _NONE_GIVEN)


def _type_problem(value, spec, options: list) -> str | None:
    """Does `value` have the schema's type? BFCL lets a value whose type is that of the gold
    answer's pass too (the gold may name a variable, as a string, for a number)."""
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in _TYPES:  # untyped or a type we do not know: the gold values decide
        return None
    example = _first_given(options)
    if not _has_type(value, kind, top=True):
        if example is not _NONE_GIVEN and type(value) is type(example):
            return None
        return f"expected {kind}, got {type(value).__name__}"
    items = spec.get("items")
    item_kind = items.get("type") if isinstance(items, dict) else None
    if kind not in ("array", "tuple") or item_kind not in _TYPES:
        return None
    lists = [option for option in options if isinstance(option, list)]
    if not lists:  # (BFCL also stops here when "" comes first: it would pass [1.0] as integers)
        return None
    for option in lists:  # every item must fit, against at least one gold list
        sample = _first_given(option)
        if all(_has_type(item, item_kind, top=False) or
               (sample is not _NONE_GIVEN and type(item) is type(sample)) for item in value):
            return None
    return f"expected a list of {item_kind}"


def schemas(example: dict) -> dict:
    """Tool name -> (properties, required) for tools with a JSON-Schema-style parameter object
    (BFCL's and OpenAI's); tools without one (xlam's flat form) are not schema-checked."""
    tools = example.get("tools", example.get("function"))
    tools = _maybe_json(tools) if isinstance(tools, (str, list)) else []
    schemas = {}
    for tool in tools if isinstance(tools, list) else []:
        tool = tool.get("function", tool) if isinstance(tool, dict) else None
        params = tool.get("parameters") if isinstance(tool, dict) else None
        props = params.get("properties") if isinstance(params, dict) else None
        if isinstance(props, dict) and isinstance(tool.get("name"), str):
            required = params.get("required")
            required = [r for r in required if isinstance(r, str)] if isinstance(required, list) else []
            schemas.setdefault(tool["name"], (props, required))
    return schemas


def _schema_problem(args: dict, gold: dict, schema, bfcl: bool) -> str | None:
    """Arguments against the tool's own schema: no unknown ones, every required one, types."""
    if schema is None:
        return None
    props, required = schema
    for key in required:
        if key not in args:
            return f"missing required argument {key!r}"
    for key, value in args.items():
        if key not in props:
            return f"the tool has no argument {key!r}"
        if key in gold:
            options = gold[key] if bfcl else [gold[key]]
            problem = _type_problem(value, props[key], options if isinstance(options, list) else [])
        else:
            problem = _type_problem(value, props[key], [])
        if problem:
            return f"argument {key!r}: {problem}"
    return None


def call_problem(name, args, g_name, g_args, schemas, bfcl) -> str | None:
    if name != g_name:
        return f"called {name}, expected {g_name}"
    return (_schema_problem(args, g_args, schemas.get(name), bfcl)
            or _argument_problem(args, g_args, bfcl))


def perfect_matching(fits: list[list[bool]]) -> bool:
    """Can every model call be paired with a distinct gold call it fits (Kuhn's algorithm)?
    BFCL pairs greedily, in order, and so misses some valid pairings of parallel calls."""
    owner = {}  # gold index -> model index

    def place(i, seen):
        for j, ok in enumerate(fits[i]):
            if ok and j not in seen:
                seen.add(j)
                if j not in owner or place(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return all(place(i, set()) for i in range(len(fits)))


def gold_calls(example: dict):
    if "ground_truth" in example:
        return True, [item for entry in _maybe_json(example["ground_truth"])
                      for item in entry.items()]
    return False, [(a["name"], _maybe_json(a["arguments"])) for a in _maybe_json(example["answers"])]
