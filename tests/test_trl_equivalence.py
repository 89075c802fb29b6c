"""Our GRPO loss is TRL's: the same tiny model, batch and settings give the same numbers and gradients.

TRL's own code does every step on its side: GRPOTrainer (transformers generation, no vLLM, no Hub)
samples the completions, turns our rewards into advantages, scores the reference with the LoRA
adapter disabled, and computes the loss (`compute_loss`). We take the very same token ids and run
rl.group_advantages, rl.reference_logprobs, rl.update and rl.policy_loss on them.

    TRL loss_type   ours (UpdateConfig.agg)
    "grpo"          "grpo"    per-completion token mean, then the batch mean
    "dapo", "bnpo"  "token"   sum over all tokens / number of tokens (one process, one batch)

Two TRL 1.16 defaults are set apart: bf16=True (autocast; the comparison here is fp32 on both sides)
and use_bias_correction_kl=True, the k3 term times the importance ratio (DeepSeek-V3.2): equal to ours
in value on-policy but not in gradient; ours has it as UpdateConfig(kl_ratio=True), tested too.
"""
import math

import pytest
import torch

import model as model_lib
import rl

trl = pytest.importorskip("trl")

G = 4
PROMPTS = ["Hello, my name is", "The capital of France is a city that has many", "1 2 3"]
REWARDS = [1.0, 0.0, 0.0, 1.0,  0.5, 2.0, -1.0, 0.25,  3.0, 3.0, 3.0, 3.0]  # binary, real-valued, no signal
BETA = 0.04
MAX_LEN = 16


def make_trainer(model_dir, out_dir, loss_type: str, temperature: float = 1.0, kl_ratio: bool = False):
    """A GRPOTrainer on the tiny model with a fresh LoRA made by TRL (peft_config), so TRL's reference is
    the adapter-disabled model, like ours. The LoRA is then moved off zero, so policy != reference."""
    from datasets import Dataset
    from peft import LoraConfig
    torch.manual_seed(0)
    base, tok = model_lib.load_model(str(model_dir), device="cpu")
    # Many stop tokens, so the sampled completions end at different lengths (ragged completion masks).
    base.generation_config.eos_token_id = list(range(tok.eos_token_id, len(tok), 9))
    args = trl.GRPOConfig(output_dir=str(out_dir), per_device_train_batch_size=len(REWARDS), num_generations=G,
                          max_completion_length=MAX_LEN, beta=BETA, epsilon=0.2, loss_type=loss_type,
                          temperature=temperature, report_to="none", use_cpu=True, save_strategy="no",
                          logging_strategy="no", seed=0, use_bias_correction_kl=kl_ratio,
                          bf16=False)  # TRL's default is bf16 autocast; the test compares fp32 with fp32
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = trl.GRPOTrainer(model=base, reward_funcs=lambda completions, **kw: REWARDS[:len(completions)],
                              args=args, train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
                              processing_class=tok, peft_config=lora)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); we call the pieces directly
    g = torch.Generator().manual_seed(1)
    for name, p in trainer.model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    trainer.model.train()
    return trainer, tok


def trl_batch(trainer):
    """TRL samples, rewards, computes advantages and reference log-probs: its training batch."""
    torch.manual_seed(0)
    return trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(G)])


def our_samples(out, advantages) -> list[rl.Sample]:
    return [rl.Sample(out["prompt_ids"][i][out["prompt_mask"][i].bool()].tolist(),
                      out["completion_ids"][i][out["completion_mask"][i].bool()].tolist(), float(a))
            for i, a in enumerate(advantages)]


def lora_grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_same_grads(ours: dict, theirs: dict):
    assert ours.keys() == theirs.keys() and len(ours) > 0
    for name in ours:  # equal up to float rounding (a different order of the same sums): relative to the norm
        assert (ours[name] - theirs[name]).norm() <= 1e-4 * theirs[name].norm(), name
    assert sum(g.abs().sum() for g in ours.values()) > 0


@pytest.mark.parametrize("loss_type, agg, temperature, kl_ratio", [
    ("grpo", "grpo", 1.0, False),
    ("grpo", "grpo", 0.7, False),  # log-probs of the tempered policy, softmax(logits / T), on both sides
    ("dapo", "token", 1.0, False),
    ("bnpo", "token", 1.0, False),
    ("dapo", "token", 1.0, True),  # TRL's defaults: loss_type "dapo", use_bias_correction_kl
])
def test_update_matches_grpo_trainer(tiny_model_dir, tmp_path, loss_type, agg, temperature, kl_ratio):
    trainer, tok = make_trainer(tiny_model_dir, tmp_path, loss_type, temperature, kl_ratio)
    model = trainer.model
    out = trl_batch(trainer)
    lengths = out["completion_mask"].sum(1)
    assert lengths.min() < lengths.max(), "want ragged completions"

    # advantages: (r - group mean) / (unbiased group std + 1e-4), 0 for a group without signal
    rewards = torch.tensor(REWARDS)
    ours_adv = rl.group_advantages(rewards, G)
    torch.testing.assert_close(ours_adv, out["advantages"].float(), rtol=0, atol=1e-6)
    assert rl.has_signal(rewards, G).tolist() == [True, True, False]

    # our batch layout is TRL's: prompts left-padded, completions right-padded
    samples = our_samples(out, ours_adv)
    ids, attn, comp = rl.pad_batch(samples, tok.pad_token_id, "cpu")
    assert torch.equal(ids, torch.cat([out["prompt_ids"], out["completion_ids"]], 1))
    assert torch.equal(attn, torch.cat([out["prompt_mask"], out["completion_mask"]], 1))

    # reference log-probs: the adapter-disabled model on both sides
    ref = rl.reference_logprobs(model, ids, attn, comp.shape[1], temperature)
    torch.testing.assert_close(ref * comp, out["ref_per_token_logps"] * comp, rtol=0, atol=2e-5)

    # the loss and its LoRA gradients: TRL's compute_loss vs rl.update (micro-batches of 5, no clipping of
    # the gradient, learning rate 0 so the weights stay put), every completion kept on both sides
    model.zero_grad(set_to_none=True)
    theirs = trainer.compute_loss(model, out)
    theirs.backward()
    their_grads = lora_grads(model)
    their_kl = trainer._metrics["train"]["kl"][-1]
    frozen = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    cfg = rl.UpdateConfig(kl_beta=BETA, clip_eps=0.2, micro_batch=5, max_grad_norm=math.inf, agg=agg,
                          temperature=temperature, kl_ratio=kl_ratio)
    stats = rl.update(model, frozen, samples, cfg, tok.pad_token_id)
    assert stats["loss"] == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)
    assert stats["kl"] == pytest.approx(their_kl, rel=1e-4, abs=1e-9) and their_kl > 0
    assert_same_grads(lora_grads(model), their_grads)
    if kl_ratio:  # the weighted KL changes the gradient, not the on-policy loss
        cfg.kl_ratio = False
        plain = rl.update(model, frozen, samples, cfg, tok.pad_token_id)
        assert plain["loss"] == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)
        with pytest.raises(AssertionError):
            assert_same_grads(lora_grads(model), their_grads)


@pytest.mark.parametrize("loss_type, agg, kl_ratio", [("grpo", "grpo", False), ("dapo", "token", True)])
def test_clipped_ratio_matches_grpo_trainer(tiny_model_dir, tmp_path, loss_type, agg, kl_ratio):
    """A reused batch (old policy != current): the clipped surrogate with epsilon 0.2 on both sides."""
    trainer, tok = make_trainer(tiny_model_dir, tmp_path, loss_type, kl_ratio=kl_ratio)
    model = trainer.model
    out = trl_batch(trainer)
    samples = our_samples(out, out["advantages"].tolist())
    ids, attn, comp = rl.pad_batch(samples, tok.pad_token_id, "cpu")
    with torch.no_grad():
        now = rl.completion_logprobs(model, ids, attn, comp.shape[1])
    old = (now + 0.3 * torch.randn(now.shape, generator=torch.Generator().manual_seed(2))) * comp
    ratio = torch.exp(now - old)[comp.bool()]
    assert ((ratio < 0.8) | (ratio > 1.2)).float().mean() > 0.2  # many tokens in the clipped region

    model.zero_grad(set_to_none=True)
    theirs = trainer.compute_loss(model, {**out, "old_per_token_logps": old})
    theirs.backward()
    their_grads = lora_grads(model)

    model.zero_grad(set_to_none=True)
    logp = rl.completion_logprobs(model, ids, attn, comp.shape[1])
    ours, _ = rl.policy_loss(logp, old, out["ref_per_token_logps"], out["advantages"], comp, BETA, clip_eps=0.2,
                             agg=agg, kl_ratio=kl_ratio)
    ours.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)
    assert_same_grads(lora_grads(model), their_grads)
