"""The GRPO/R3 arithmetic by hand: advantages, the clipped loss with k3 KL, and where gradient goes."""
import math

import pytest
import torch

import rl
import rollout
import tasks

LOG = math.log


def test_group_advantages_by_hand():
    r = torch.tensor([1., 0., 0., 0., 1., 1., 0., 0., 1., 1., 1., 1.])
    a = rl.group_advantages(r, 4, eps=0.0)
    # group 1: mean 1/4, unbiased std sqrt((9/16 + 3/16) / 3) = 1/2
    assert a[:4].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5])
    # group 2: mean 1/2, unbiased std sqrt(4/4 / 3)
    s = math.sqrt(1 / 3)
    assert a[4:8].tolist() == pytest.approx([0.5 / s, 0.5 / s, -0.5 / s, -0.5 / s])
    assert a[8:].tolist() == [0, 0, 0, 0] or torch.isnan(a[8:]).all()  # eps=0: 0/0 here; eps>0 below
    assert rl.group_advantages(r, 4)[8:].tolist() == [0, 0, 0, 0]
    assert rl.has_signal(r, 4).tolist() == [True, True, False]


def test_policy_loss_by_hand():
    logp = torch.tensor([[LOG(0.5), LOG(0.25), 0.0]])
    ref = torch.tensor([[LOG(0.25), LOG(0.25), 0.0]])
    mask = torch.tensor([[1., 1., 0.]])  # the third column is padding
    loss, kl = rl.policy_loss(logp, logp, ref, torch.tensor([2.0]), mask, kl_beta=0.1)
    k3 = 0.5 - LOG(0.5) - 1  # exp(ref - logp) - (ref - logp) - 1 with ref - logp = log(1/2)
    assert kl[0, :2].tolist() == pytest.approx([k3, 0.0])
    # ratio 1: per token -(A - beta * kl); mean over the two real tokens
    assert loss.item() == pytest.approx((-(2 - 0.1 * k3) - 2) / 2)
    # token aggregation over two sequences: sum of per-token terms / number of tokens
    logp2 = torch.cat([logp, torch.tensor([[LOG(0.5), 0.0, 0.0]])])
    mask2 = torch.cat([mask, torch.tensor([[1., 0., 0.]])])
    loss_tok, _ = rl.policy_loss(logp2, logp2, logp2, torch.tensor([2.0, -1.0]), mask2, 0.0, agg="token")
    assert loss_tok.item() == pytest.approx((-2 - 2 + 1) / 3)


@pytest.mark.parametrize("ratio, adv, expected", [
    (2.0, 1.0, 1.2),     # positive advantage: gain capped at 1 + eps
    (2.0, -1.0, -2.0),   # negative advantage: the pessimistic (unclipped) term wins
    (0.5, 1.0, 0.5),
    (0.5, -1.0, -0.8),   # capped at 1 - eps
])
def test_ratio_clipping(ratio, adv, expected):
    old = torch.tensor([[0.0]])
    logp = torch.tensor([[LOG(ratio)]])
    loss, _ = rl.policy_loss(logp, old, logp, torch.tensor([adv]), torch.ones(1, 1), 0.0, clip_eps=0.2)
    assert loss.item() == pytest.approx(-expected)


def test_pad_batch_layout():
    samples = [rl.Sample([1, 2, 3], [4, 5], 1.0), rl.Sample([6], [7, 8, 9], -1.0)]
    ids, attn, comp = rl.pad_batch(samples, pad_id=0, device="cpu")
    assert ids.tolist() == [[1, 2, 3, 4, 5, 0], [0, 0, 6, 7, 8, 9]]
    assert attn.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert comp.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_r3_gradient_reaches_only_reflection_tokens(tiny_model_dir):
    """An R3 sample: prompt = task + failed attempt + reflection instruction, completion = reflection.
    The loss must equal the hand formula over the reflection tokens alone, and the last hidden state
    gets gradient exactly at the positions that predict reflection tokens."""
    import model as model_lib
    m, tok = model_lib.load_model(str(tiny_model_dir), lora_r=4, device="cpu")
    ex = {"nums": [3, 5, 7], "target": 22, "id": "x"}
    conv = rollout.then(tasks.first_attempt_messages("countdown", ex), "<answer> 3 + 5 </answer>",
                        tasks.reflect_instruction("countdown"))
    prompt = rollout.chat_ids(tok, conv)
    reflections = [tok("I used the wrong numbers.")["input_ids"], tok("Multiply 3 by 5.")["input_ids"][:4]]
    samples = [rl.Sample(prompt, r, a) for r, a in zip(reflections, [1.0, -1.0])]
    ids, attn, comp = rl.pad_batch(samples, tok.pad_token_id, "cpu")
    C = comp.shape[1]
    grabbed = {}

    def keep(module, args, output):
        output.retain_grad()
        grabbed["h"] = output
    hook = m.base_model.model.model.norm.register_forward_hook(keep)
    logp = rl.completion_logprobs(m, ids, attn, C)
    hook.remove()
    ref = rl.reference_logprobs(m, ids, attn, C)
    loss, _ = rl.policy_loss(logp, logp.detach(), ref, torch.tensor([1.0, -1.0]), comp, kl_beta=0.01)
    loss.backward()

    # hand formula from a plain full-sequence forward pass
    with torch.no_grad():
        full = torch.log_softmax(m(input_ids=ids, attention_mask=attn,
                                   position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits.float(), -1)
    P = ids.shape[1] - C
    expected = 0.0
    for b, (r, a) in enumerate(zip(reflections, [1.0, -1.0])):
        terms = []
        for t, token in enumerate(r):
            lp = full[b, P - 1 + t, token].item()
            assert lp == pytest.approx(logp[b, t].item(), abs=1e-4)
            d = ref[b, t].item() - lp
            terms.append(-(a - 0.01 * (math.exp(d) - d - 1)))
        expected += sum(terms) / len(terms)
    assert loss.item() == pytest.approx(expected / 2, abs=1e-4)

    g = grabbed["h"].grad.abs().sum(-1)  # [B, T]
    for b, r in enumerate(reflections):
        predicting = set(range(P - 1, P - 1 + len(r)))
        nonzero = {t for t in range(ids.shape[1]) if g[b, t] > 0}
        assert nonzero == predicting, (b, sorted(nonzero), sorted(predicting))
    trained = [p.grad for n, p in m.named_parameters() if p.requires_grad]
    assert any(x is not None and x.abs().sum() > 0 for x in trained)


def test_update_skips_nothing_and_steps(tiny_model_dir):
    """rl.update: micro-batching gives the same gradient as one batch (the normalizer is global)."""
    import model as model_lib
    grads = []
    for micro in (1, 4):
        torch.manual_seed(0)
        m, tok = model_lib.load_model(str(tiny_model_dir), lora_r=4, device="cpu")
        for n, p in m.named_parameters():  # make LoRA B nonzero so the policy differs from the reference
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05)
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.0)
        samples = [rl.Sample([5, 6, 7], [8, 9, 10][:k + 1], a) for k, a in enumerate([1.0, -0.5, 0.25])]
        stats = rl.update(m, opt, samples, rl.UpdateConfig(kl_beta=0.1, micro_batch=micro), tok.pad_token_id)
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.requires_grad]))
        assert stats["kl"] > 0 and stats["grad_norm"] > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-5)  # float rounding: a group's prompt is run once


@pytest.mark.parametrize("updates", [1, 2])
def test_update_runs_the_common_prefix_once_with_the_same_gradient(tiny_model_dir, monkeypatch, updates):
    """KV reuse in rl.update: the prompts' common prefix runs once per pass (reference, policy), whatever
    the micro-batching, and the step it takes is the one without reuse, micro-batch by micro-batch."""
    import model as model_lib
    import sample
    prefix = [11, 12, 13, 14, 15, 16]
    samples = [rl.Sample(prefix + tail, comp, a) for tail, comp, a in [
        ([5, 6], [8, 9, 10], 1.0), ([5, 6], [8], -0.5), ([7], [9, 9], 0.25), ([7, 8, 9], [10, 11], -0.75),
        ([7], [12], 0.5)]]
    weights = []
    for reuse, micro in [(False, 5), (True, 1), (True, 2), (True, 5)]:
        monkeypatch.setattr(sample, "REUSE", reuse)
        torch.manual_seed(0)
        m, tok = model_lib.load_model(str(tiny_model_dir), lora_r=4, device="cpu")
        for n, p in m.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05)
        before = torch.cat([p.detach().flatten() for p in m.parameters() if p.requires_grad])
        lengths = []
        hook = m.get_base_model().register_forward_pre_hook(
            lambda mod, args, kwargs: lengths.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        rl.update(m, opt, samples, rl.UpdateConfig(kl_beta=0.1, micro_batch=micro, updates_per_batch=updates,
                                                  max_grad_norm=math.inf), tok.pad_token_id)
        hook.remove()
        passes = 1 + (updates > 1) + updates  # the reference, the sampling policy (if reused), each update
        assert lengths.count((1, len(prefix))) == (passes if reuse else 0)
        weights.append(torch.cat([p.detach().flatten() for p in m.parameters() if p.requires_grad]))
    for w in weights[1:]:
        torch.testing.assert_close(w, weights[0], rtol=0, atol=1e-5)
    assert (weights[0] - before).abs().max() > 1e-3  # the step did move the weights
