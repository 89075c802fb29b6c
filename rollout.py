"""The shared loop of every method: attempt -> verify -> reflect / correct -> retry.

R3, plain GRPO, SCoRe, Re-ReST and eval.py all sample through these functions. Each returns plain
records holding the exact sampled token ids (the trainer scores exactly what was sampled) and the
decoded text (the verifier judges the text).
"""
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import cli
import sample
import tasks
from sample import generate, mix_seed, trim_past

_bar = None  # the token bar of the innermost progress() block; sample_turns feeds it


@contextmanager
def progress(desc: str, leave: bool = True):
    """In the block, every sample_turns call counts its sampled tokens on one tqdm bar (a count and a
    rate), so no wait on the sampler is silent. Drawn at a terminal only (cli.bar): in a log, the loop
    around the block prints its line when the block is done."""
    global _bar
    outer = _bar
    _bar = cli.bar(desc=desc, unit="tok", leave=leave)
    try:
        yield _bar
    finally:
        _bar.close()
        _bar = outer


@dataclass
class Gen:
    """How to sample one phase: length, temperature and nucleus; seed makes a step reproducible:
    one per conversation (a list), or an int s (conversation k gets s + k), or None."""
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | list[int] | None = None
    batch_size: int | None = None  # prompts per sampler call; None: as many as sample.KV_BUDGET_BYTES holds


@dataclass
class Turn:
    """One sampled assistant turn: the prompt it answered, its tokens, its text, and the verdict."""
    messages: list[dict]     # the conversation up to (not including) this turn
    prompt_ids: list[int]
    ids: list[int]
    text: str
    verdict: object = None   # verifiers.Verdict, for attempts/retries; None for reflections
    past: object = field(default=None, repr=False)  # its sample.Past when kept for a next turn; taken by it


@dataclass
class Episode:
    """One query's trajectory. R3: attempt, then on failure G reflections, each with one retry."""
    example: dict
    attempt: Turn
    reflections: list[Turn] = field(default_factory=list)
    retries: list[Turn] = field(default_factory=list)  # retries[i] follows reflections[i]


def chat_ids(tok, messages: list[dict]) -> list[int]:
    """Token ids of a conversation, ending with the assistant's generation prompt (model.chat_prompt_ids:
    a system turn folded into the first user turn for templates that refuse one)."""
    from model import chat_prompt_ids
    return chat_prompt_ids(tok, messages)


def then(messages: list[dict], reply: str, instruction: str) -> list[dict]:
    """The conversation continued by the assistant's reply and the user's next instruction."""
    return messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": instruction}]


def take_pasts(turns: list[Turn]) -> list:
    """The turns' kept caches, removed from them (a cache is continued once, then freed)."""
    pasts = [t.past for t in turns]
    for t in turns:
        t.past = None
    return pasts


def sample_turns(model, tok, conversations: list[list[dict]], gen: Gen, n: int = 1, pasts: list | None = None,
                 keep: bool = False) -> list[Turn]:
    """n sampled replies to each conversation, prompt-major, in chunks of gen.batch_size prompts.
    pasts[k]: the kept cache of conversation k's previous turn (take_pasts), continued from the longest
    prefix it shares with the conversation's tokens (all of it, unless the template re-tokenizes the end
    of a reply differently; then from the first differing token): prompt_ids are always the tokens
    the model conditioned on.
    keep: each turn keeps its cache (turn.past) for a next turn."""
    from model import stop_token_ids
    stops = stop_token_ids(tok, getattr(model, "generation_config", None))
    prompts = [chat_ids(tok, c) for c in conversations]
    seeds = gen.seed if gen.seed is None or isinstance(gen.seed, list) else \
        [gen.seed + k for k in range(len(prompts))]
    assert seeds is None or len(seeds) == len(prompts), "one seed per conversation"
    pasts = list(pasts) if pasts is not None and sample.REUSE else [None] * len(prompts)
    turns = []
    size = gen.batch_size or sample.prompts_per_call(model, prompts, gen.max_new_tokens, n)
    for start in range(0, len(prompts), size):
        end = start + size
        chunk = prompts[start:end]
        past = [trim_past(p, q) for p, q in zip(pasts[start:end], chunk)]
        pasts[start:end] = [None] * len(chunk)  # freed as soon as they are in this chunk's batch
        outs = generate(model, chunk, n=n, max_new_tokens=gen.max_new_tokens, temperature=gen.temperature,
                        top_p=gen.top_p, stop_token_ids=stops, seed=None if seeds is None else seeds[start:end],
                        pad_token_id=tok.pad_token_id, past=past if any(past) else None, share_prefix=sample.REUSE,
                        keep=keep and sample.REUSE, on_tokens=None if _bar is None else _bar.update)
        outs, kept = outs if keep and sample.REUSE else (outs, [None] * len(outs))
        for i, (ids, p) in enumerate(zip(outs, kept)):
            j = start + i // n
            turns.append(Turn(conversations[j], prompts[j], ids, tok.decode(ids, skip_special_tokens=True), past=p))
    return turns


def judge(task: str, turns: list[Turn], examples: list[dict]) -> list[Turn]:
    for turn, example in zip(turns, examples):
        turn.verdict = tasks.verify(task, turn.text, example)
    return turns


def attempt(model, tok, task: str, examples: list[dict], gen: Gen, n: int = 1, keep: bool = False) -> list[Turn]:
    """First attempts: n per example, prompt-major, each verified. Seeds per example; the n samples of
    one are its streams j. keep: each keeps its cache for the next turn (correct, reflect_and_retry)."""
    turns = sample_turns(model, tok, [tasks.first_attempt_messages(task, ex) for ex in examples], gen, n, keep=keep)
    return judge(task, turns, [ex for ex in examples for _ in range(n)])


def reflect_and_retry(model, tok, task: str, examples: list[dict], attempts: list[Turn], reflect_gen: Gen,
                      retry_gen: Gen, n_reflections: int = 1, reflect_prompt: str = "approach",
                      retry_context: str = "conversation") -> list[Episode]:
    """R3 steps 2-3: after each failed attempt, n reflections (asked for as tasks.REFLECT_PROMPTS[reflect_prompt]
    says), and after each reflection one retry, which sees the conversation or, with retry_context "reflection",
    only the question and the reflection (tasks.retry_with_note_messages).
    Each continues the cache of the turn before it, where kept (attempt(keep=True)) and where it is a continuation.
    Seeds as lists, one per attempt: attempt i's reflections are reflect_gen.seed[i]'s streams
    j = 0..n-1; the retry after reflection j gets the seed mix_seed(retry_gen.seed[i], j)."""
    G = n_reflections
    convs = [then(a.messages, a.text, tasks.reflect_instruction(task, reflect_prompt)) for a in attempts]
    fresh = retry_context == "reflection"
    reflections = sample_turns(model, tok, convs, reflect_gen, G, take_pasts(attempts), keep=not fresh)
    retry_convs = [tasks.retry_with_note_messages(task, examples[i // G], r.text) if fresh else
                   then(r.messages, r.text, tasks.retry_instruction(task, examples[i // G]))
                   for i, r in enumerate(reflections)]
    if isinstance(retry_gen.seed, list):
        retry_gen = replace(retry_gen, seed=[mix_seed(s, j) for s in retry_gen.seed for j in range(G)])
    pasts = None if fresh else take_pasts(reflections)
    retries = judge(task, sample_turns(model, tok, retry_convs, retry_gen, 1, pasts), [ex for ex in examples for _ in range(G)])
    return [Episode(ex, a, reflections[i * G:(i + 1) * G], retries[i * G:(i + 1) * G])
            for i, (ex, a) in enumerate(zip(examples, attempts))]


def correct(model, tok, task: str, examples: list[dict], attempts: list[Turn], gen: Gen, n: int = 1) -> list[Turn]:
    """SCoRe's second attempt: the fixed correction instruction, no external feedback; continues each
    attempt's kept cache. Seeds per attempt; its n samples are its streams j."""
    convs = [then(a.messages, a.text, tasks.correction_instruction(task)) for a in attempts]
    return judge(task, sample_turns(model, tok, convs, gen, n, take_pasts(attempts)),
                 [ex for ex in examples for _ in range(n)])


def second_try(model, tok, task: str, examples: list[dict], first: list[Turn], mode: str, gen: Gen,
               reflect_gen: Gen, retry_gen: Gen, reflect_prompt: str = "approach", retry_context: str = "conversation"):
    """The second try after first tries kept with keep=True: (second tries, the r3 reflection of each, None
    where none was written). r3: a failed try gets a reflection and a retry, a passed one stands;
    score: gen samples the correction on every example."""
    if mode == "score":
        return correct(model, tok, task, examples, first, gen), [None] * len(first)
    failed = [i for i, t in enumerate(first) if not t.verdict.correct]
    take_pasts([t for t in first if t.verdict.correct])  # a passed try is not continued
    episodes = reflect_and_retry(model, tok, task, [examples[i] for i in failed], [first[i] for i in failed],
                                 reflect_gen, retry_gen, reflect_prompt=reflect_prompt, retry_context=retry_context)
    second, reflections = list(first), [None] * len(first)
    for i, ep in zip(failed, episodes):
        second[i], reflections[i] = ep.retries[0], ep.reflections[0]
    return second, reflections


def two_tries(model, tok, task: str, examples: list[dict], gen: Gen, mode: str = "r3",
              reflect_gen: Gen | None = None, reflect_prompt: str = "approach",
              retry_context: str = "conversation") -> tuple[list[Turn], list[Turn]]:
    """The papers' evaluation: a first try on every example, then a second try (second_try); gen samples
    both tries."""
    first = attempt(model, tok, task, examples, gen, keep=True)
    second, _ = second_try(model, tok, task, examples, first, mode, gen, reflect_gen or gen, gen, reflect_prompt,
                           retry_context)
    return first, second
