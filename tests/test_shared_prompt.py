"""rl.shared_prompt_logprobs (each distinct prompt run once, its cache shared by its group) gives the
log-probs and LoRA gradients of the plain way: every completion with its own copy of the prompt."""
import os

import pytest
import torch

import model as model_lib
import rl
import sample


@pytest.fixture(scope="module")
def lora_tiny(tiny_model_dir):
    torch.manual_seed(0)
    m, tok = model_lib.load_model(str(tiny_model_dir), lora_r=4, device="cpu")
    g = torch.Generator().manual_seed(1)
    for name, p in m.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05  # the adapter off != on
    return m, tok


def samples(tok, prefix=""):
    """prefix: a common prefix of every prompt (a system prompt), run once by shared_prompt_logprobs."""
    a, b = tok(prefix + "Hello, my name is")["input_ids"], tok(prefix + "The capital of France is a city that has many")["input_ids"]
    c = tok(prefix + "1 2 3")["input_ids"]
    comps = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15], [16, 17, 18, 19], [20], [21, 22, 23]]
    prompts = [a, a, a, b, b, c, a]  # groups, a lone prompt, and a prompt seen again later
    return [rl.Sample(p, x, 0.0) for p, x in zip(prompts, comps)]


def grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("temperature, prefix, reuse", [(1.0, "", True), (0.7, "", True),
                                                        (1.0, "You are a helpful assistant. Be brief. ", True),
                                                        (1.0, "You are a helpful assistant. Be brief. ", False)])
def test_shared_prompt_logprobs_match_plain(lora_tiny, temperature, prefix, reuse, monkeypatch):
    m, tok = lora_tiny
    monkeypatch.setattr(sample, "REUSE", reuse)
    batch = samples(tok, prefix)
    assert bool(prefix) == (len(os.path.commonprefix([s.prompt_ids for s in batch])) > 0)
    ids, attn, comp = rl.pad_batch(batch, tok.pad_token_id, "cpu")
    weights = torch.randn(comp.shape, generator=torch.Generator().manual_seed(3))

    m.zero_grad(set_to_none=True)
    plain = rl.completion_logprobs(m, ids, attn, comp.shape[1], temperature)
    (plain * weights * comp).sum().backward()
    plain_grads = grads(m)

    m.zero_grad(set_to_none=True)
    forwards = []
    hook = m.get_base_model().register_forward_pre_hook(lambda mod, args: forwards.append(1))
    shared, shared_mask = rl.shared_prompt_logprobs(m, batch, tok.pad_token_id, "cpu", temperature)
    hook.remove()
    # the distinct prompts, then the completions; with KV reuse and a common prefix, that prefix first
    assert len(forwards) == (3 if prefix and reuse else 2)
    (shared * weights * shared_mask).sum().backward()
    assert torch.equal(shared_mask, comp)
    torch.testing.assert_close(shared * comp, plain * comp, rtol=0, atol=1e-5)
    shared_grads = grads(m)
    assert shared_grads.keys() == plain_grads.keys() and plain_grads
    for name in plain_grads:  # equal up to float rounding: the same sums in another order
        assert (shared_grads[name] - plain_grads[name]).norm() <= 1e-4 * plain_grads[name].norm(), name

    with torch.no_grad(), m.disable_adapter():  # the reference: the same with the adapter off
        ref_shared, _ = rl.shared_prompt_logprobs(m, batch, tok.pad_token_id, "cpu", temperature)
    ref_plain = rl.reference_logprobs(m, ids, attn, comp.shape[1], temperature)
    torch.testing.assert_close(ref_shared * comp, ref_plain * comp, rtol=0, atol=1e-5)
    assert not torch.allclose(ref_plain * comp, plain.detach() * comp)


@pytest.mark.parametrize("which", [[0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1], [0, 1, 1, 2], [1, 0], [0, 0, 1]])
def test_repeat_rows_is_a_gather_with_its_gradient(which):
    """rl.repeat_rows: x[which], by an expand where groups are contiguous and of one size, else a gather;
    the values and the gradient are a gather's either way."""
    x = torch.randn(3, 2, 4, 5, requires_grad=True)
    idx = torch.tensor(which)
    w = torch.randn(len(which), 2, 4, 5)
    (rl.repeat_rows(x, idx) * w).sum().backward()
    got = x.grad.clone()
    x.grad = None
    ref = x[idx]
    (ref * w).sum().backward()
    assert torch.equal(rl.repeat_rows(x, idx), ref)
    torch.testing.assert_close(got, x.grad)
