"""rollout with KV reuse (sample.REUSE): the next turn continues the previous turn's cache as far as the
chat template's tokens agree with it (all of it, or up to the first differing token); the tokens are
those of reuse off and of HF generate. Seeds are per conversation, so a row's sample does not depend
on its batch."""
import os

import pytest
import torch

import decode
import rollout
import sample
import tasks
from rollout import Gen


@pytest.fixture
def prefills(monkeypatch):
    """Records, per sample.prefill call, (rows, rows that start from a past, each row's past length)."""
    calls, plain = [], sample.prefill

    def prefill(model, prompts, pasts, *args):
        calls.append((len(prompts), sum(p is not None for p in pasts), [len(p.ids) if p else 0 for p in pasts]))
        return plain(model, prompts, pasts, *args)
    monkeypatch.setattr(sample, "prefill", prefill)
    return calls


def ids_of(turns):
    return [(t.prompt_ids, t.ids) for t in turns]


def test_two_tries_reuse_matches_no_reuse_and_hf_embedded(smol, prefills, monkeypatch):
    m, tok = smol
    examples = tasks.load_examples("countdown", "test", n=3)
    run = lambda: rollout.two_tries(m, tok, "countdown", examples, Gen(12, 0), "r3", Gen(12, 0))  # noqa: E731
    first, second = run()
    failed = sum(not t.verdict.correct for t in first)
    # the few-shot prefix once at batch 1, the 3 prompts after it; then the reflections and the retries,
    # every row continuing its previous turn's cache
    assert failed and [c[:2] for c in prefills] == [(1, 0), (3, 3), (failed, failed), (failed, failed)]
    monkeypatch.setattr(sample, "REUSE", False)
    prefills.clear()
    first_off, second_off = run()
    assert not any(c[1] for c in prefills) and prefills[0][0] == 3
    assert ids_of(first) == ids_of(first_off) and ids_of(second) == ids_of(second_off)
    # HF generate on the exact prompt each retry was sampled from
    from model import stop_token_ids
    stops = stop_token_ids(tok)
    for t in second:
        out = m.generate(torch.tensor([t.prompt_ids]), do_sample=False, max_new_tokens=12,
                         eos_token_id=stops, pad_token_id=tok.pad_token_id)[0, len(t.prompt_ids):].tolist()
        assert out[:len(t.ids)] == t.ids


def test_a_row_that_does_not_extend_its_cache_continues_where_they_agree(tiny, prefills):
    m, tok = tiny
    examples = tasks.load_examples("countdown", "test", n=3)
    gen = Gen(8, 0)
    first = rollout.attempt(m, tok, "countdown", examples, gen, keep=True)
    assert all(t.past is not None and t.past.ids == t.prompt_ids + t.ids[:-1] for t in first)
    first[1].text = "a reply the model did not sample"
    convs = [rollout.then(t.messages, t.text, "Again.") for t in first]
    agree = [len(os.path.commonprefix([t.past.ids, rollout.chat_ids(tok, c)])) for t, c in zip(first, convs)]
    assert agree[1] < len(first[1].past.ids)  # row 1's new reply leaves its cache at its first token
    prefills.clear()
    reused = rollout.sample_turns(m, tok, convs, gen, pasts=rollout.take_pasts(first))
    assert all(t.past is None for t in first)  # taken: freed once continued
    # every row continues a cache; row 1 the part of it before the reply (one whole prefill would have
    # widened every row's new tokens to row 1's full prompt)
    assert prefills[0][:2] == (3, 3) and prefills[0][2][1] == agree[1]
    plain = rollout.sample_turns(m, tok, convs, gen)
    assert ids_of(reused) == ids_of(plain)
    assert [t.prompt_ids for t in reused] == [rollout.chat_ids(tok, c) for c in convs]


def test_rollout_rows_follow_their_own_seeds(tiny, monkeypatch):
    """Conversation k gets gen.seed[k] (an int s: s + k); reflect_and_retry derives its seeds per
    attempt; the same rows sampled in another batch or chunking give the same tokens.
    On transformers' forward, whose rows are bit-for-bit the same in any batch: decode.decode_step
    attends to the batch's common prefix apart, so a row's logits depend on its batch at the level of
    float rounding, and the tiny random model's near-uniform distribution turns that into other draws
    (tests/test_sample.py checks decode_step's rows against transformers' within rounding). Bit for bit only
    on one thread: with 2, a 4-row batch and 1-row chunks split their matmuls differently, and a retry drew another
    token (a fresh clone on a 2-core Xeon, 2026-12-06; the SIGKILL test pins one thread for the same reason)."""
    monkeypatch.setattr(decode, "FAST_DECODE", False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check_rows_follow_their_own_seeds(tiny)
    finally:
        torch.set_num_threads(threads)


def check_rows_follow_their_own_seeds(tiny):
    m, tok = tiny
    examples = tasks.load_examples("countdown", "test", n=4)
    convs = [tasks.first_attempt_messages("countdown", ex) for ex in examples]
    seeds = [101, 202, 303, 404]
    texts = lambda turns: [t.ids for t in turns]  # noqa: E731
    full = texts(rollout.sample_turns(m, tok, convs, Gen(8, seed=seeds), n=2))
    assert full == texts(rollout.sample_turns(m, tok, convs, Gen(8, seed=seeds, batch_size=3), n=2))
    assert full[4:] == texts(rollout.sample_turns(m, tok, convs[2:], Gen(8, seed=seeds[2:]), n=2))
    assert texts(rollout.sample_turns(m, tok, convs, Gen(8, seed=7), n=2)) == \
        texts(rollout.sample_turns(m, tok, convs, Gen(8, seed=[7, 8, 9, 10], batch_size=1), n=2))

    def episodes(idx, batch_size):
        attempts = rollout.attempt(m, tok, "countdown", [examples[i] for i in idx],
                                   Gen(8, seed=[seeds[i] for i in idx], batch_size=batch_size), keep=True)
        return rollout.reflect_and_retry(m, tok, "countdown", [examples[i] for i in idx], attempts,
                                         Gen(6, seed=[seeds[i] + 1 for i in idx], batch_size=batch_size),
                                         Gen(8, seed=[seeds[i] + 2 for i in idx], batch_size=batch_size),
                                         n_reflections=2)
    flat = lambda eps: [(texts(e.reflections), texts(e.retries)) for e in eps]  # noqa: E731
    whole = flat(episodes([0, 1, 2, 3], 4))
    assert flat(episodes([3, 1], 1)) == [whole[3], whole[1]]
    assert len({tuple(r) for e in whole for r in e[1]}) > 4  # retries really sampled, not all alike


def test_a_reflection_only_retry_sees_the_question_and_the_reflection(tiny):
    """--retry-context reflection: each retry is sampled from the first try's prompt led by its own
    reflection (tasks.retry_with_note_messages), with no cache of the conversation; the paper's retry
    continues the conversation, the failed attempt in it."""
    m, tok = tiny
    examples = tasks.load_examples("countdown", "test", n=2)
    gen = Gen(8, 1.0, seed=[5, 6])

    def episodes(context):
        attempts = rollout.attempt(m, tok, "countdown", examples, gen, keep=True)
        for a in attempts:
            a.text = "<answer> 1 + 1 </answer>"  # a failed answer the prompt would show
        return rollout.reflect_and_retry(m, tok, "countdown", examples, attempts, Gen(6, 1.0, seed=[7, 8]), gen,
                                         n_reflections=2, retry_context=context)
    for ep in episodes("reflection"):
        for r, t in zip(ep.reflections, ep.retries):
            assert r.past is None  # nothing kept for a retry that does not continue it
            assert t.prompt_ids == rollout.chat_ids(tok, tasks.retry_with_note_messages("countdown", ep.example, r.text))
            assert "1 + 1" not in tok.decode(t.prompt_ids)
    for ep in episodes("conversation"):
        assert all("1 + 1" in tok.decode(t.prompt_ids) for t in ep.retries)
