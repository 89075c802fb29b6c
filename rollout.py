"""The shared loop of every method: attempt -> verify -> reflect / correct -> retry.

R3, plain GRPO, SCoRe, Re-ReST and eval.py all sample through these functions. Each returns plain
records holding the exact sampled token ids (the trainer scores exactly what was sampled) and the
decoded text (the verifier judges the text).
"""
from dataclasses import dataclass, field, replace

import tasks
from sample import generate


@dataclass
class Gen:
    """How to sample one phase: length, temperature and nucleus; seed makes a step reproducible."""
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | list[int] | None = None  # a list: one seed per conversation; an int s: s + k for the k-th
    batch_size: int = 16  # prompts per sampler call, bounds memory in long evals


def conversation_seeds(gen: Gen, count: int) -> list[int] | None:
    """The seed of each of count conversations (see Gen.seed)."""
    if gen.seed is None:
        return None
    return [gen.seed + k for k in range(count)] if isinstance(gen.seed, int) else list(gen.seed)


def per_sample(seeds: list[int] | None, n: int) -> list[int] | None:
    """Seeds for the n conversations that continue each of the given ones (sample j of seed s)."""
    return None if seeds is None else [(s * 1_000_003 + 7919 * (j + 1)) % (1 << 63) for s in seeds for j in range(n)]


@dataclass
class Turn:
    """One sampled assistant turn: the prompt it answered, its tokens, its text, and the verdict."""
    messages: list[dict]     # the conversation up to (not including) this turn
    prompt_ids: list[int]
    ids: list[int]
    text: str
    verdict: object = None   # verifiers.Verdict, for attempts/retries; None for reflections


@dataclass
class Episode:
    """One query's trajectory. R3: attempt, then on failure G reflections, each with one retry."""
    example: dict
    attempt: Turn
    reflections: list[Turn] = field(default_factory=list)
    retries: list[Turn] = field(default_factory=list)  # retries[i] follows reflections[i]


def chat_ids(tok, messages: list[dict]) -> list[int]:
    """Token ids of a conversation, ending with the assistant's generation prompt."""
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


def then(messages: list[dict], reply: str, instruction: str) -> list[dict]:
    """The conversation continued by the assistant's reply and the user's next instruction."""
    return messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": instruction}]


def sample_turns(model, tok, conversations: list[list[dict]], gen: Gen, n: int = 1) -> list[Turn]:
    """n sampled replies to each conversation, prompt-major, in chunks of gen.batch_size prompts."""
    from model import stop_token_ids
    stops = stop_token_ids(tok)
    prompts = [chat_ids(tok, c) for c in conversations]
    seeds = conversation_seeds(gen, len(prompts))
    turns = []
    for start in range(0, len(prompts), gen.batch_size):
        chunk = prompts[start:start + gen.batch_size]
        seed = None if seeds is None else seeds[start:start + gen.batch_size]
        outs = generate(model, chunk, n=n, max_new_tokens=gen.max_new_tokens, temperature=gen.temperature,
                        top_p=gen.top_p, stop_token_ids=stops, seed=seed, pad_token_id=tok.pad_token_id)
        for i, ids in enumerate(outs):
            j = start + i // n
            turns.append(Turn(conversations[j], prompts[j], ids, tok.decode(ids, skip_special_tokens=True)))
    return turns


def judge(task: str, turns: list[Turn], examples: list[dict]) -> list[Turn]:
    for turn, example in zip(turns, examples):
        turn.verdict = tasks.verify(task, turn.text, example)
    return turns


def attempt(model, tok, task: str, examples: list[dict], gen: Gen, n: int = 1) -> list[Turn]:
    """First attempts: n per example, prompt-major, each verified."""
    turns = sample_turns(model, tok, [tasks.first_attempt_messages(task, ex) for ex in examples], gen, n)
    return judge(task, turns, [ex for ex in examples for _ in range(n)])


def reflect_and_retry(model, tok, task: str, examples: list[dict], attempts: list[Turn], reflect_gen: Gen,
                      retry_gen: Gen, n_reflections: int = 1) -> list[Episode]:
    """R3 steps 2-3: after each failed attempt, n reflections, and after each reflection one retry."""
    convs = [then(a.messages, a.text, tasks.reflect_instruction(task)) for a in attempts]
    reflections = sample_turns(model, tok, convs, reflect_gen, n_reflections)
    retry_convs = [then(r.messages, r.text, tasks.retry_instruction(task)) for r in reflections]
    retry_gen = replace(retry_gen, seed=per_sample(conversation_seeds(retry_gen, len(convs)), n_reflections))
    retries = judge(task, sample_turns(model, tok, retry_convs, retry_gen),
                    [ex for ex in examples for _ in range(n_reflections)])
    G = n_reflections
    return [Episode(ex, a, reflections[i * G:(i + 1) * G], retries[i * G:(i + 1) * G])
            for i, (ex, a) in enumerate(zip(examples, attempts))]


def correct(model, tok, task: str, examples: list[dict], attempts: list[Turn], gen: Gen, n: int = 1) -> list[Turn]:
    """SCoRe's second attempt: the fixed correction instruction, no external feedback."""
    convs = [then(a.messages, a.text, tasks.correction_instruction(task)) for a in attempts]
    return judge(task, sample_turns(model, tok, convs, gen, n), [ex for ex in examples for _ in range(n)])


def two_tries(model, tok, task: str, examples: list[dict], gen: Gen, mode: str = "r3",
              reflect_gen: Gen | None = None) -> tuple[list[Turn], list[Turn]]:
    """The papers' evaluation: a first try on every example, then a second try.
    r3: a failed first try is followed by a reflection and a retry; a passed one stands.
    score: the correction instruction on every example, with no feedback."""
    first = attempt(model, tok, task, examples, gen)
    if mode == "score":
        return first, correct(model, tok, task, examples, first, gen)
    failed = [i for i, t in enumerate(first) if not t.verdict.correct]
    episodes = reflect_and_retry(model, tok, task, [examples[i] for i in failed], [first[i] for i in failed],
                                 reflect_gen or gen, gen)
    second = list(first)
    for i, ep in zip(failed, episodes):
        second[i] = ep.retries[0]
    return first, second
