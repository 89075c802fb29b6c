"""sample.generate: exact greedy decoding, shared prefill, early exit, seeds, LoRA/4-bit."""
import contextlib
import sys

import pytest
import torch

import model as model_lib
import decode
import sample
from sample import generate

TEXTS = ["Hello, my name is", "The capital of France is a city that has many", "1 2 3", "Q"]


@pytest.fixture(params=[True, False], ids=["decode_step", "hf-forward"])
def fast_decode(request, monkeypatch):
    """Both decode paths: decode.decode_step, and transformers' forward (decode.FAST_DECODE = False)."""
    monkeypatch.setattr(decode, "FAST_DECODE", request.param)
    return request.param


def hf_greedy(m, tok, texts, max_new_tokens, stop_ids):
    """Reference: HF generate on the same left-padded batch, cut after the first stop token."""
    enc = tok(texts, return_tensors="pt", padding=True)
    out = m.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                     eos_token_id=stop_ids or None)
    result = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        result.append(row[:cut])
    return result


def ours_greedy(m, tok, texts, max_new_tokens, stop_ids, n=1):
    prompts = [tok(t)["input_ids"] for t in texts]
    return generate(m, prompts, n=n, max_new_tokens=max_new_tokens, temperature=0, stop_token_ids=stop_ids,
                    pad_token_id=tok.pad_token_id)


def test_greedy_matches_hf_generate_tiny(tiny, fast_decode):
    m, tok = tiny
    assert ours_greedy(m, tok, TEXTS, 24, []) == hf_greedy(m, tok, TEXTS, 24, [])


def test_greedy_matches_hf_generate_with_stop_tokens_tiny(tiny, fast_decode):
    m, tok = tiny
    free = ours_greedy(m, tok, TEXTS, 24, [])
    stop = [free[0][3], free[2][5]]  # tokens the model really emits, so some rows stop early
    ours = ours_greedy(m, tok, TEXTS, 24, stop)
    assert ours == hf_greedy(m, tok, TEXTS, 24, stop)
    assert len(ours[0]) <= 4 and ours[0][-1] in stop


def test_greedy_matches_hf_generate_embedded(smol, fast_decode):
    m, tok = smol
    stop = model_lib.stop_token_ids(tok)
    assert ours_greedy(m, tok, TEXTS[:3], 16, stop) == hf_greedy(m, tok, TEXTS[:3], 16, stop)


@contextlib.contextmanager
def rows_per_forward(m, monkeypatch):
    """The rows fed at each forward, in order: transformers' forward (the prefills, and the decode steps
    where decode.decode_step is off) and decode_step's."""
    sizes, decode_step = [], decode.decode_step

    def counted(dec, tokens, *args):
        sizes.append(len(tokens))
        return decode_step(dec, tokens, *args)
    monkeypatch.setattr(decode, "decode_step", counted)
    hook = m.register_forward_pre_hook(lambda mod, args, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        yield sizes
    finally:
        hook.remove()
        monkeypatch.setattr(decode, "decode_step", decode_step)


def test_prefill_shared_and_finished_rows_dropped(tiny, fast_decode, monkeypatch):
    m, tok = tiny
    with rows_per_forward(m, monkeypatch) as batch_sizes:
        free = ours_greedy(m, tok, TEXTS[:2], 12, [], n=3)
        # a stop token that prompt 0 emits at some step k >= 1 and prompt 1 never emits
        k = next(k for k in range(1, 12) if free[0][k] not in free[0][:k] + free[3])
        batch_sizes.clear()
        ours = ours_greedy(m, tok, TEXTS[:2], 12, [free[0][k]], n=3)
    assert batch_sizes[0] == 2          # one prefill per prompt, not per sample
    assert batch_sizes[1] == 6          # then n rows per prompt
    assert min(batch_sizes[1:]) == 3    # prompt 0's three samples stopped after k + 1 tokens
    assert len(batch_sizes) == 12 and batch_sizes.count(6) == k  # tokens 1..k came from 6-row steps
    assert [len(o) for o in ours[:3]] == [k + 1] * 3
    # greedy samples of one prompt are identical, and prompt-major
    assert ours[3] == ours[4] == ours[5] == free[3]


def test_sampling_reproducible_under_seed(tiny):
    m, tok = tiny
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    a = generate(m, prompts, n=4, max_new_tokens=10, temperature=1.0, seed=7, pad_token_id=tok.pad_token_id)
    b = generate(m, prompts, n=4, max_new_tokens=10, temperature=1.0, seed=7, pad_token_id=tok.pad_token_id)
    c = generate(m, prompts, n=4, max_new_tokens=10, temperature=1.0, seed=8, pad_token_id=tok.pad_token_id)
    assert a == b and a != c
    assert len(a) == 16 and all(len(x) == 10 for x in a)


def test_tiny_top_p_is_greedy(tiny):
    m, tok = tiny
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    nucleus = generate(m, prompts, max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=0,
                       pad_token_id=tok.pad_token_id)
    assert nucleus == generate(m, prompts, max_new_tokens=8, temperature=0, pad_token_id=tok.pad_token_id)


def test_ignore_stop_gives_fixed_length(tiny):
    m, tok = tiny
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    every_token = list(range(len(tok)))
    outs = generate(m, prompts, n=2, max_new_tokens=5, temperature=1.0, seed=0, stop_token_ids=every_token,
                    ignore_stop=True, pad_token_id=tok.pad_token_id)
    assert [len(o) for o in outs] == [5] * 8
    stopped = generate(m, prompts, n=2, max_new_tokens=5, temperature=1.0, seed=0, stop_token_ids=every_token,
                       pad_token_id=tok.pad_token_id)
    assert [len(o) for o in stopped] == [1] * 8


def test_4bit_lora_forward_backward_and_sampling_on_cpu(tiny_model_dir):
    m, tok = model_lib.load_model(str(tiny_model_dir), lora_r=4, load_in_4bit=True, device="cpu")
    assert any("Linear4bit" in type(mod).__name__ for mod in m.modules())
    trainable, total = model_lib.count_parameters(m)
    assert 0 < trainable < total
    ids = torch.tensor([tok("a b c d e f")["input_ids"]])
    loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in m.named_parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    outs = generate(m, [ids[0].tolist()], n=2, max_new_tokens=4, temperature=1.0, seed=0,
                    pad_token_id=tok.pad_token_id)
    assert len(outs) == 2 and all(len(o) == 4 for o in outs)


def test_pick_draws_from_the_distribution():
    """The inverse-CDF draw: frequencies match the probabilities, zero-probability tokens never come."""
    from sample import pick
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    logits = torch.log(probs).expand(20000, -1)
    uniforms = lambda seed: torch.rand(20000, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    draws = pick(logits, 1.0, 1.0, uniforms(0))
    freq = torch.bincount(draws, minlength=6).float() / len(draws)
    assert freq[[0, 2, 5]].sum() == 0
    assert torch.allclose(freq, probs, atol=0.015)
    # nucleus: top_p=0.6 keeps {1, 3} (0.5 < 0.6, then 0.8 >= 0.6), renormalised to 5/8, 3/8
    freq_p = torch.bincount(pick(logits, 1.0, 0.6, uniforms(1)), minlength=6).float() / 20000
    assert torch.allclose(freq_p, torch.tensor([0, 5 / 8, 0, 3 / 8, 0, 0]), atol=0.015)


def test_pick_equals_a_plain_inverse_cdf():
    """The two-level draw (block masses, then one block's cumulative sum) picks the token a cumulative sum
    over the whole vocabulary picks; a uniform next to 1 never lands on a zero-probability token."""
    from sample import pick
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5000, generator=g) * 3
    logits[:, 2100:] = float("-inf")  # the tail of the distribution, and most of a block, has no mass
    for seed in range(20):
        u = torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        cdf = torch.softmax(logits, -1).double().cumsum(-1)
        plain = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(1)
        assert torch.equal(pick(logits, 1.0, 1.0, u), plain)
    edge = pick(logits, 1.0, 1.0, torch.full((64,), 1 - 2 ** -53, dtype=torch.float64))
    assert (edge < 2100).all() and torch.equal(edge, logits.isfinite().sum(-1) - 1)


# ---------------------------------------------------------------------------------------------- reuse
# A shared prefix prefilled once, and a finished turn's cache continued by the next turn, must give the
# tokens of a plain prefill (and of HF generate on the whole sequence).

PREFIX = "You are a helpful assistant. Answer briefly and in plain words, like the examples before. "


def hf_greedy_ids(m, tok, prompts, max_new_tokens, stop_ids=()):
    enc = tok.pad({"input_ids": prompts}, return_tensors="pt")
    out = m.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                     eos_token_id=list(stop_ids) or None)
    rows = out[:, enc["input_ids"].shape[1]:].tolist()
    return [row[:next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))] for row in rows]


def greedy(m, tok, prompts, max_new_tokens, stop_ids=(), **kw):
    return generate(m, prompts, max_new_tokens=max_new_tokens, temperature=0, stop_token_ids=stop_ids,
                    pad_token_id=tok.pad_token_id, **kw)


def two_turns(m, tok, stop_ids, n_tokens):
    """Greedy turn 1 on prompts sharing a prefix, its caches kept; turn 2's prompts extend each row's
    prompt + reply by a different number of tokens. Returns (turn-2 prompts, the kept Pasts)."""
    prompts = [tok(PREFIX + t)["input_ids"] for t in TEXTS]
    outs, pasts = greedy(m, tok, prompts, n_tokens, stop_ids, keep=True)
    assert outs == greedy(m, tok, prompts, n_tokens, stop_ids, share_prefix=False) == \
        hf_greedy_ids(m, tok, prompts, n_tokens, stop_ids)
    assert [p.ids for p in pasts] == [p + o[:-1] for p, o in zip(prompts, outs)]
    follow = [" Thanks.", " Now say it again in other words, please:", "\n", " Why?"]
    return [p + o + tok(f)["input_ids"] for p, o, f in zip(prompts, outs, follow)], pasts


@pytest.mark.parametrize("which", ["tiny", "smol"])
def test_shared_prefix_and_continuation_match_plain_and_hf(which, request, fast_decode):
    m, tok = request.getfixturevalue(which)
    stop = model_lib.stop_token_ids(tok) if which == "smol" else []
    n_tokens = 12 if which == "smol" else 16
    turn2, pasts = two_turns(m, tok, stop, n_tokens)
    reused = greedy(m, tok, turn2, n_tokens, stop, past=pasts)
    assert reused == greedy(m, tok, turn2, n_tokens, stop, share_prefix=False)
    assert reused == hf_greedy_ids(m, tok, turn2, n_tokens, stop)
    # only some rows continued, one of them twice (n = 2), the others prefilled from scratch
    some = greedy(m, tok, [turn2[2], turn2[0]], n_tokens, stop, past=[pasts[2], None], n=2)
    assert some == [reused[2], reused[2], reused[0], reused[0]]


def test_prefix_prefilled_once_then_suffixes_only(tiny):
    m, tok = tiny
    prompts = [tok(PREFIX + t)["input_ids"] for t in TEXTS]
    shared = len(tok(PREFIX)["input_ids"]) - 1  # the last prefix token may merge with what follows
    lengths = []
    hook = m.register_forward_pre_hook(lambda mod, args, kw: lengths.append(tuple(kw["input_ids"].shape)),
                                       with_kwargs=True)
    try:
        greedy(m, tok, prompts, 3)
    finally:
        hook.remove()
    assert lengths[0][0] == 1 and lengths[0][1] >= shared          # the prefix, once, at batch 1
    assert lengths[1] == (4, max(map(len, prompts)) - lengths[0][1])  # then only each row's own tokens


def test_sampled_rows_do_not_depend_on_the_batch(tiny):
    """Per-row seeded streams: a row's tokens are the same alone, in another batch, or in other chunks."""
    m, tok = tiny
    prompts = [tok(PREFIX + t)["input_ids"] for t in TEXTS]
    seeds = [11, 12, 13, 14]
    sample = lambda ps, ss, **kw: generate(m, ps, n=3, max_new_tokens=12, temperature=1.0, seed=ss,  # noqa: E731
                                           pad_token_id=tok.pad_token_id, **kw)
    batch = sample(prompts, seeds)
    assert len(set(map(tuple, batch))) > 6  # really random: samples of one prompt differ
    alone = [x for p, s in zip(prompts, seeds) for x in sample([p], [s])]
    chunks = sample(prompts[:1], seeds[:1]) + sample(prompts[1:], seeds[1:], share_prefix=False)
    reordered = sample(prompts[::-1], seeds[::-1])
    assert batch == alone == chunks
    assert [reordered[3 * (3 - i) + j] for i in range(4) for j in range(3)] == batch
    assert sample(prompts, 11) == batch  # an int seed s means seeds s, s + 1, ...
    assert sample(prompts, [21, 12, 13, 14])[3:] == batch[3:] and sample(prompts, [21, 12, 13, 14])[:3] != batch[:3]


def test_keep_returns_each_rows_cache(tiny):
    """A kept Past holds exactly its ids' keys: continuing from it gives the plain run's next logits."""
    m, tok = tiny
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    outs, pasts = generate(m, prompts, n=2, max_new_tokens=6, temperature=1.0, seed=3,
                           pad_token_id=tok.pad_token_id, keep=True)
    for p, past, o in zip([p for p in prompts for _ in range(2)], pasts, outs):
        assert past.ids == p + o[:-1]
        assert all(k.shape[2] == len(past.ids) for k in past.keys + past.values)
        with torch.no_grad():
            plain = m(input_ids=torch.tensor([past.ids]), use_cache=True).past_key_values
        torch.testing.assert_close(past.keys[-1], plain.layers[-1].keys, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prompt, kept", [
    ([5, 6, 7, 8, 9], 4),   # extends the past: all of it
    ([5, 6, 7, 1, 2], 3),   # differs at the 4th token: the first three
    ([5, 6, 7, 8], 3),      # equals the past: one token left to run (its logits start the sampling)
    ([1, 6, 7, 8, 9], 0),   # differs at once: nothing
])
def test_trim_past_keeps_the_part_a_prompt_starts_with(tiny, prompt, kept):
    m, _ = tiny
    with torch.no_grad():
        cache = m(input_ids=torch.tensor([[5, 6, 7, 8]]), use_cache=True).past_key_values
    past = sample.Past([5, 6, 7, 8], [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers])
    trimmed = sample.trim_past(past, prompt)
    if kept == 0:
        assert trimmed is None
        return
    assert trimmed.ids == prompt[:kept]
    with torch.no_grad():  # a prefix's cache is the start of the longer one's: attention is causal
        plain = m(input_ids=torch.tensor([prompt[:kept]]), use_cache=True).past_key_values
    for layer, k, v in zip(plain.layers, trimmed.keys, trimmed.values):
        torch.testing.assert_close(k, layer.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(v, layer.values, rtol=1e-4, atol=1e-5)
    assert sample.trim_past(None, prompt) is None


def test_one_host_sync_per_decode_step(tiny, monkeypatch):
    """The decode loop reads one small tensor per step on the host (which rows stopped) and the tokens once
    at the end: on a GPU nothing else in sample.py waits for the queue."""
    m, tok = tiny
    reads = []
    for name in ("tolist", "item", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            if sys._getframe(1).f_code.co_filename == sample.__file__:
                reads.append(sys._getframe(1).f_code.co_name)
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    outs = generate(m, prompts, n=2, max_new_tokens=10, temperature=1.0, seed=0, ignore_stop=True,
                    pad_token_id=tok.pad_token_id)
    assert [len(o) for o in outs] == [10] * 8
    assert reads.count("generate") == 10 + 1 and set(reads) == {"generate"}


def test_stopped_rows_leave_the_batch_in_groups(tiny, fast_decode, monkeypatch):
    """A row that stops stays in the batch (masked) until a quarter of the batch has stopped; then all
    stopped rows leave at once, and the outputs are those of rows that left at once."""
    m, tok = tiny
    prompts = [tok(t)["input_ids"] for t in TEXTS * 2]
    with rows_per_forward(m, monkeypatch) as batch_sizes:
        free = generate(m, prompts, max_new_tokens=12, temperature=0, pad_token_id=tok.pad_token_id)
        stop = [free[0][2]]  # a token row 0 emits (and maybe others)
        batch_sizes.clear()
        ours = generate(m, prompts, max_new_tokens=12, temperature=0, stop_token_ids=stop,
                        pad_token_id=tok.pad_token_id)
    cut = [next((i + 1 for i, t in enumerate(o) if t in stop), len(o)) for o in free]
    assert ours == [o[:c] for o, c in zip(free, cut)]
    stopped_by = [sum(c <= s + 1 for c in cut) for s in range(12)]  # rows stopped after step s
    expected, dead, rows = [8], 0, 8
    for s in range(11):
        dead = stopped_by[s] - (8 - rows)
        if rows - dead == 0:
            break
        if dead * 4 >= rows:
            rows -= dead
        expected.append(rows)
    assert batch_sizes == expected and min(expected) < 8


def test_prompts_per_call_fits_the_kv_budget(tiny, monkeypatch):
    """rollout.sample_turns splits its prompts into calls that fit sample.KV_BUDGET_BYTES; the chunks give
    the tokens of one call (per-row seeded streams)."""
    import rollout
    m, tok = tiny
    c = m.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    convs = [[{"role": "user", "content": t}] for t in TEXTS]
    prompts = [rollout.chat_ids(tok, c) for c in convs]
    longest = max(map(len, prompts))
    monkeypatch.setattr(sample, "KV_BUDGET_BYTES", per_token * 2 * (longest + 8) * 3)
    assert sample.prompts_per_call(m, prompts, 8, n=2) == 3
    calls = []
    original = rollout.generate
    monkeypatch.setattr(rollout, "generate", lambda model, chunk, **kw: calls.append(len(chunk)) or
                        original(model, chunk, **kw))
    turns = rollout.sample_turns(m, tok, convs, rollout.Gen(8, 1.0, seed=5), n=2)
    assert calls == [3, 1]
    monkeypatch.setattr(sample, "KV_BUDGET_BYTES", 2**40)
    calls.clear()
    assert [t.ids for t in rollout.sample_turns(m, tok, convs, rollout.Gen(8, 1.0, seed=5), n=2)] == [t.ids for t in turns]
    assert calls == [4]


# ---------------------------------------------------------------------------------------- decode_step
# decode.decode_step decodes without transformers' forward: LoRA merged, q/k/v and gate/up fused, the
# batch's common prefix attended once for all rows. Its logits and cache writes must be transformers'.

def lora_tiny(tiny_model_dir, seed=0):
    """The tiny model with a LoRA on every linear layer, B random (a trained adapter is not zero)."""
    m, tok = model_lib.load_model(str(tiny_model_dir), lora_r=4, device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval(), tok


def tiny_qwen2(tmp_path, tok):
    """A tiny random Qwen2 (q/k/v with biases, untied head)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=2048,
                         tie_word_embeddings=False, initializer_range=0.2)
    torch.manual_seed(1)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m, tok = model_lib.load_model(str(tmp_path), device="cpu")
    return m.eval(), tok


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "plain"])
@pytest.mark.parametrize("kind", ["llama", "llama+lora", "llama+lora, adapter off", "qwen2"])
def test_decode_step_equals_transformers_forward(kind, pack, tiny, tiny_model_dir, tmp_path, monkeypatch):
    """Turn 2 of a conversation whose rows continue caches of different lengths sharing a prefix: three
    decode steps by decode_step and by transformers' forward (on copies of one prefilled cache) give the
    same logits and write the same keys and values."""
    import copy
    monkeypatch.setattr(decode, "PACK_WEIGHTS", pack and decode.PACK_WEIGHTS)
    m, tok = tiny
    if "lora" in kind:
        m, _ = lora_tiny(tiny_model_dir)
    elif kind == "qwen2":
        m, _ = tiny_qwen2(tmp_path, tok)
    off = m.disable_adapter() if "off" in kind else contextlib.nullcontext()
    with off, torch.inference_mode():
        turn2, pasts = two_turns(m, tok, [], 6)
        cache, mask, logits = sample.prefill(m, turn2, pasts, tok.pad_token_id, 8)
        assert cache.shared >= len(tok(PREFIX)["input_ids"]) - 1  # the rows' common prefix is shared
        dec = decode.decoder(m, len(turn2))
        assert dec is not None and (dec.head.packed is not None) == decode.PACK_WEIGHTS
        theirs = copy.deepcopy(cache)
        pos = mask.sum(1, keepdim=True) - 1
        tokens = logits.argmax(-1)
        for step in range(3):
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
            pos = pos + 1
            ours_logits = decode.decode_step(dec, tokens, pos, cache, mask)
            hf_logits = m(input_ids=tokens[:, None], attention_mask=mask, position_ids=pos, cache=theirs,
                          use_cache=True).logits[:, -1]
            torch.testing.assert_close(ours_logits, hf_logits, rtol=1e-4, atol=1e-4)
            tokens = hf_logits.argmax(-1)
        for ours, hf in zip(cache.layers, theirs.layers):
            torch.testing.assert_close(ours.keys, hf.keys, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours.values, hf.values, rtol=1e-5, atol=1e-5)
    if kind == "llama+lora":  # the adapter is merged for decoding only: the model's own weights are untouched
        base = m.get_base_model().model.layers[0].self_attn.q_proj
        assert not base.merged and base.lora_B["default"].weight.abs().sum() > 0


def test_decoder_declines_what_it_does_not_know(tiny, tiny_model_dir, monkeypatch):
    """decode_step runs Llama and Qwen2 in float32 with plain or LoRA linears; anything else (4-bit layers,
    bf16, the switch off) decodes by transformers' forward."""
    m, tok = tiny
    assert decode.decoder(m, 4) is not None
    monkeypatch.setattr(decode, "FAST_DECODE", False)
    assert decode.decoder(m, 4) is None
    monkeypatch.setattr(decode, "FAST_DECODE", True)
    q4, _ = model_lib.load_model(str(tiny_model_dir), lora_r=4, load_in_4bit=True, device="cpu")
    assert decode.decoder(q4, 4) is None
    bf16, _ = model_lib.load_model(str(tiny_model_dir), lora_r=4, device="cpu", dtype=torch.bfloat16)
    assert decode.decoder(bf16, 4) is None  # merged into bf16 weights, the LoRA update would be rounded away
