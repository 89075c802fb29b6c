"""The learning half of the loop, shared by R3, GRPO and SCoRe: token log-probs, group advantages,
the clipped policy-gradient loss with a KL penalty, one optimizer update, data-parallel helpers; plus
the supervised (NLL) update of Re-ReST on the same layout. (Checkpoints are rundir.py's.)

A training sample is (prompt ids, completion ids, advantage): only the completion's tokens get
gradient. For R3 the "prompt" holds the task, the failed attempt and the reflection instruction, and
the "completion" is the reflection, so attempt and retry tokens are masked out by construction.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist

import sample
from sample import common_prefix_len


@dataclass
class Sample:
    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float
    kl_beta: float | None = None  # per-sample KL coefficient (SCoRe's stage I); None: the trainer's


# ---------------------------------------------------------------------------------------------- advantages

def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: (r - group mean) / (group std + eps), groups being consecutive runs of group_size rewards."""
    r = rewards.view(-1, group_size).float()
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def has_signal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per group: do its rewards differ? A group of equal rewards has zero advantage everywhere."""
    r = rewards.view(-1, group_size)
    return (r != r[:, :1]).any(1)


# ---------------------------------------------------------------------------------------------- log-probs

def pad_batch(samples: list[Sample], pad_id: int, device):
    """Left-pad prompts and right-pad completions, so every completion starts at the same column:
    the layout the sampler used, and the last C+1 positions hold every completion logit."""
    P = max(len(s.prompt_ids) for s in samples)
    C = max(len(s.completion_ids) for s in samples)
    ids, attn, comp = [], [], []
    for s in samples:
        lp, lc = len(s.prompt_ids), len(s.completion_ids)
        ids.append([pad_id] * (P - lp) + s.prompt_ids + s.completion_ids + [pad_id] * (C - lc))
        attn.append([0] * (P - lp) + [1] * (lp + lc) + [0] * (C - lc))
        comp.append([1] * lc + [0] * (C - lc))
    t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
    return t(ids), t(attn), t(comp, torch.float32)


LOGPROB_CHUNK = 256  # answer tokens per chunk in token_logprobs: 256 x 152k fp32 temporaries are ~150 MB


class _TokenLogprobs(torch.autograd.Function):
    """log_softmax(logits / T) at the targets, computed LOGPROB_CHUNK rows at a time in fp32. Keeps only the
    logits (their own dtype) and one logsumexp per token for backward, where the plain way keeps fp32
    [B, C, V] tensors (~1.2 MB per answer token at a 152k vocabulary); backward recomputes the softmax."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, chunk):
        out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for b, s, e in _row_chunks(targets.shape, chunk):  # views of logits, never a copy of all of them
            x = logits[b, s:e].float() / temperature
            lse[b, s:e] = torch.logsumexp(x, -1)
            out[b, s:e] = x.gather(-1, targets[b, s:e, None]).squeeze(-1) - lse[b, s:e]
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for b, s, e in _row_chunks(targets.shape, ctx.chunk):
            g = grad[b, s:e, None].float()
            d = torch.exp(logits[b, s:e].float() / ctx.temperature - lse[b, s:e, None]).mul_(-g)  # -p * g
            d.scatter_add_(-1, targets[b, s:e, None], g)  # + g at the target: d/dx of x_t - logsumexp(x)
            grad_logits[b, s:e] = d.div_(ctx.temperature)
        return grad_logits, None, None, None


def _row_chunks(shape, chunk: int):
    B, C = shape
    for b in range(B):
        for s in range(0, C, chunk):
            yield b, s, min(s + chunk, C)


def token_logprobs(logits, targets, temperature: float = 1.0, chunk: int | None = None) -> torch.Tensor:
    """log softmax(logits / T) at targets: logits [B, C, V] (any float dtype), targets [B, C] -> [B, C] fp32,
    with gradient. T = 0 (greedy) counts as 1. The same numbers as log_softmax + gather, in less memory."""
    T = temperature if temperature and temperature != 1.0 else 1.0
    return _TokenLogprobs.apply(logits, targets, T, chunk or LOGPROB_CHUNK)


def completion_logprobs(model, input_ids, attention_mask, n_completion: int, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) for the last n_completion columns, [B, C]. Only those logits are computed.
    temperature: the sampling temperature, so these are the log-probs of the policy that drew the
    tokens, softmax(logits / T) (as TRL and verl score them); 0 (greedy) counts as 1."""
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
    # use_cache=False: nothing reads a cache here, and activation checkpointing forbids one
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False,
                   logits_to_keep=n_completion + 1).logits[:, :-1]
    return token_logprobs(logits, input_ids[:, -n_completion:], temperature)


def reference_logprobs(model, input_ids, attention_mask, n_completion: int, temperature: float = 1.0) -> torch.Tensor:
    """The reference policy is the base model: the same weights with the LoRA adapter switched off,
    so no second copy of the model is held in memory."""
    with torch.no_grad(), model.disable_adapter():
        return completion_logprobs(model, input_ids, attention_mask, n_completion, temperature)


def prefix_cache(model, ids: list[int], device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The keys and values of `ids` (prompts' common prefix), run at batch 1: per layer, (keys, values)."""
    from transformers import DynamicCache
    cache = DynamicCache()
    model(input_ids=torch.tensor([ids], device=device), cache=cache, use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in cache.layers]


def repeat_rows(x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """x[which] along dim 0. Where which is 0,0,..,1,1,.. (every prompt's group together, all of one
    size: GRPO's and R3's layout) an expand, whose backward is a sum; a gather's backward scatters
    into zeros one row at a time, which was ~3% of an R3 update's CPU time in a profile on 2 cores."""
    P, B = x.shape[0], len(which)
    if B % P == 0 and torch.equal(which, torch.arange(P, device=which.device).repeat_interleave(B // P)):
        return x[:, None].expand(P, B // P, *x.shape[1:]).reshape(B, *x.shape[1:])
    return x.index_select(0, which)


def shared_prompt_logprobs(model, samples: list[Sample], pad_id: int, device, temperature: float = 1.0,
                           prefix: tuple[int, list] | None = None):
    """completion_logprobs(pad_batch(samples)) computed with each distinct prompt run once: its keys and
    values are copied to every completion that follows it (a GRPO or R3 group shares one prompt), with
    gradient through both. With KV reuse (sample.REUSE) the distinct prompts' longest common prefix (a
    system prompt, few-shot examples) is run once too, at batch 1, and broadcast to them; prefix=(its
    length, prefix_cache of it) passes one run beforehand (rl.update runs it once for all its
    micro-batches). Same numbers; for a group of G, about G times less prompt compute and memory.
    Returns (log-probs [B, C], completion mask [B, C])."""
    if getattr(model, "is_activation_checkpointing", False):  # no cache under checkpointing: the plain way
        ids, attn, comp = pad_batch(samples, pad_id, device)
        return completion_logprobs(model, ids, attn, comp.shape[1], temperature), comp
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer
    prompts = list(dict.fromkeys(tuple(s.prompt_ids) for s in samples))
    which = torch.tensor([prompts.index(tuple(s.prompt_ids)) for s in samples], device=device)
    C = max(len(s.completion_ids) for s in samples)
    t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
    if prefix is None:  # this batch's own common prefix, run here
        L = common_prefix_len(prompts) if len(prompts) > 1 and sample.REUSE else 0
        prefix = (L, prefix_cache(model, list(prompts[0][:L]), device) if L else [])
    L, kv = prefix
    cache = DynamicCache()
    if L:
        cache.layers = []
        for k, v in kv:  # a view per prompt, no copy: the next forward concatenates onto it
            layer = DynamicLayer()
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k.expand(len(prompts), -1, -1, -1), v.expand(len(prompts), -1, -1, -1)
            cache.layers.append(layer)
    suffixes = [p[L:] for p in prompts]
    S = max(map(len, suffixes))
    s_ids = t([[pad_id] * (S - len(p)) + list(p) for p in suffixes])
    p_mask = t([[1] * L + [0] * (S - len(p)) + [1] * len(p) for p in suffixes])
    c_ids = t([s.completion_ids + [pad_id] * (C - len(s.completion_ids)) for s in samples])
    c_mask = t([[1] * len(s.completion_ids) + [0] * (C - len(s.completion_ids)) for s in samples])
    # the prompts: keys/values for the cache, and the logits at each prompt's last token (-> first completion token)
    first = model(input_ids=s_ids, attention_mask=p_mask, position_ids=(p_mask.cumsum(1) - 1).clamp(min=0)[:, L:],
                  cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    for layer in cache.layers:  # one copy of its prompt's cache per completion (differentiable)
        layer.keys, layer.values = repeat_rows(layer.keys, which), repeat_rows(layer.values, which)
    mask = torch.cat([p_mask[which], c_mask], 1)
    positions = p_mask.sum(1)[which, None] + torch.arange(C, device=device)
    rest = model(input_ids=c_ids, attention_mask=mask, position_ids=positions, cache=cache,
                 use_cache=True, logits_to_keep=C).logits[:, :-1]
    logits = torch.cat([first[which, None], rest], 1)
    return token_logprobs(logits, c_ids, temperature), c_mask.float()


# ---------------------------------------------------------------------------------------------- the loss

def policy_loss(logp, old_logp, ref_logp, advantages, mask, kl_beta, clip_eps: float = 0.2,
                normalizer: float | None = None, agg: str = "grpo", kl_ratio: bool = False):
    """Clipped policy-gradient loss with a k3 KL penalty (DeepSeekMath GRPO, eq. 3; Schulman's k3).

    logp, old_logp, ref_logp, mask: [B, C]; advantages: [B]; kl_beta: float or [B].
    agg="grpo": mean over each completion's tokens, then sum over completions / normalizer (the number
    of completions in the whole update, so micro-batches add up to one batch mean).
    agg="token": sum over all tokens / normalizer (the number of completion tokens in the update).
    kl_ratio: weight the k3 term by the importance ratio pi/pi_old (DeepSeek-V3.2; TRL's
    use_bias_correction_kl, its default): the same value on-policy, but a differentiable ratio, so the
    gradient becomes the unbiased reverse-KL gradient. Off (DeepSeekMath's GRPO, R3) by default.
    Returns (loss, per-token KL tensor).
    """
    ratio = torch.exp(logp - old_logp)
    A = advantages[:, None]
    objective = torch.min(ratio * A, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * A)
    log_ref_ratio = ref_logp - logp
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # k3: unbiased, always >= 0
    beta = kl_beta if not torch.is_tensor(kl_beta) else kl_beta[:, None]
    per_token = -(objective - beta * (kl * ratio if kl_ratio else kl)) * mask
    if agg == "grpo":
        per_sample = per_token.sum(1) / mask.sum(1).clamp(min=1)
        loss = per_sample.sum() / (normalizer or len(per_sample))
    else:
        loss = per_token.sum() / (normalizer or mask.sum().clamp(min=1))
    return loss, kl


@dataclass
class UpdateConfig:
    kl_beta: float = 0.001          # R3 / GRPO KL coefficient (R3 paper: 0.001)
    clip_eps: float = 0.2           # PPO ratio clip, only active when a batch is reused (updates > 1)
    updates_per_batch: int = 1      # PPO-style epochs over one sampled batch
    micro_batch: int = 8            # completions per forward/backward (gradient accumulation)
    micro_batch_tokens: int = 0     # and at most this many padded tokens per micro-batch (0: no cap)
    max_grad_norm: float = 1.0
    agg: str = "grpo"
    temperature: float = 1.0        # the sampling temperature: log-probs are of softmax(logits / T), as in TRL
    kl_ratio: bool = False          # k3 term times pi/pi_old (TRL's use_bias_correction_kl); see policy_loss


def micro_batches(samples: list[Sample], max_rows: int, max_tokens: int = 0) -> list[list[Sample]]:
    """Consecutive runs of at most max_rows samples and, with max_tokens, at most that many padded tokens
    (rows x (longest prompt + longest completion), what the forward pass holds): activations grow with
    tokens, not rows, so a cap in tokens bounds memory when lengths vary. A longer sample goes alone."""
    chunks, prompt, completion = [], 0, 0
    for s in samples:
        p, c = max(prompt, len(s.prompt_ids)), max(completion, len(s.completion_ids))
        if chunks and len(chunks[-1]) < max_rows and not (max_tokens and (len(chunks[-1]) + 1) * (p + c) > max_tokens):
            chunks[-1].append(s)
            prompt, completion = p, c
        else:
            chunks.append([s])
            prompt, completion = len(s.prompt_ids), len(s.completion_ids)
    return chunks


def update(model, optimizer, samples: list[Sample], cfg: UpdateConfig, pad_id: int) -> dict:
    """One optimizer step (or cfg.updates_per_batch steps) on a list of samples; returns stats.
    In data-parallel runs every rank calls this with its own samples (possibly none). The normaliser
    counts the samples (or tokens) of every rank and the gradients are summed, so the step is the one a
    single process would take on the whole batch. No sample anywhere: no step."""
    device = next(model.parameters()).device
    chunks = micro_batches(samples, cfg.micro_batch, cfg.micro_batch_tokens)
    n_tokens = sum(len(s.completion_ids) for s in samples)
    n_samples, n_tokens_all = all_sum([len(samples), n_tokens])
    stats = {"loss": 0.0, "kl": 0.0, "kl_sum": 0.0, "kl_tokens": n_tokens, "grad_norm": 0.0}
    if n_samples == 0:
        return stats
    normalizer = n_samples if cfg.agg == "grpo" else n_tokens_all
    def logprobs(chunk, prefix):
        return shared_prompt_logprobs(model, chunk, pad_id, device, cfg.temperature, prefix)
    # KV reuse: all the samples' prompts' common prefix is run once per pass, not once per micro-batch.
    prompts = list(dict.fromkeys(tuple(s.prompt_ids) for s in samples))
    L = common_prefix_len(prompts) if sample.REUSE and prompts and (len(prompts) > 1 or len(chunks) > 1) \
        and not getattr(model, "is_activation_checkpointing", False) else 0
    def run_prefix():
        return (L, prefix_cache(model, list(prompts[0][:L]), device)) if L else None
    # Frozen per-batch quantities: the reference (the adapter off, see reference_logprobs), and the
    # sampling policy when the batch is reused.
    olds = []
    with torch.no_grad():
        with model.disable_adapter():
            prefix = run_prefix()
            refs = [logprobs(chunk, prefix)[0] for chunk in chunks]
        if cfg.updates_per_batch > 1:
            prefix = run_prefix()
            olds = [logprobs(chunk, prefix)[0] for chunk in chunks]
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(cfg.updates_per_batch):
        optimizer.zero_grad(set_to_none=True)
        loss_sum, kl_sum = 0.0, 0.0
        # The prefix's keys and values enter every micro-batch as leaves that collect its gradient;
        # the prefix then runs backward once, with the sum (the same gradient, one prefix pass).
        prefix, leaves = run_prefix(), None
        if prefix:
            kv = prefix[1]
            leaves = [tuple(x.detach().requires_grad_() for x in pair) for pair in kv]
            prefix = (L, leaves)
        for k, chunk in enumerate(chunks):
            logp, comp = logprobs(chunk, prefix)
            old = olds[k] if olds else logp.detach()
            adv = torch.tensor([s.advantage for s in chunk], device=device)
            beta = torch.tensor([cfg.kl_beta if s.kl_beta is None else s.kl_beta for s in chunk], device=device)
            loss, kl = policy_loss(logp, old, refs[k], adv, comp, beta, cfg.clip_eps, normalizer, cfg.agg,
                                   cfg.kl_ratio)
            loss.backward()
            loss_sum += loss.item()
            kl_sum += (kl * comp).sum().item()
        if leaves:
            torch.autograd.backward([x for pair in kv for x in pair], [x.grad for pair in leaves for x in pair])
        sum_grads(params)
        stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
        optimizer.step()
        # loss: this rank's part of the global loss (the parts add up); kl: token mean over all ranks
        stats["loss"], stats["kl_sum"] = loss_sum, kl_sum
        stats["kl"] = all_sum([kl_sum])[0] / max(n_tokens_all, 1)
    return stats


# ---------------------------------------------------------------------------------------------- supervised

def nll_loss(logp: torch.Tensor, mask: torch.Tensor, normalizer: float | None = None) -> torch.Tensor:
    """Token-mean negative log-likelihood of the completion tokens: sum(-logp * mask) / normalizer
    (the number of completion tokens in the whole update, so micro-batches add up to one mean)."""
    return -(logp * mask).sum() / (normalizer or mask.sum().clamp(min=1))


def supervised_update(model, optimizer, samples: list[Sample], pad_id: int, micro_batch: int = 8,
                      max_grad_norm: float = 1.0, micro_batch_tokens: int = 0) -> dict:
    """One optimizer step of supervised fine-tuning (Re-ReST) on (prompt, completion) samples: the same
    layout and log-probs as the RL update, the loss nll_loss; advantages and KL are not used.
    In data-parallel runs every rank calls this (an empty list is allowed); the token mean is global and
    the gradients are summed, as in update."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    n_tokens = sum(len(s.completion_ids) for s in samples)
    n_tokens_all = all_sum([n_tokens])[0]  # the global token count: the ranks' losses add up to one mean
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for chunk in micro_batches(samples, micro_batch, micro_batch_tokens):
        ids, attn, comp = pad_batch(chunk, pad_id, device)
        loss = nll_loss(completion_logprobs(model, ids, attn, comp.shape[1]), comp, n_tokens_all)
        loss.backward()
        loss_sum += loss.item()
    sum_grads(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item()
    optimizer.step()
    return {"loss": loss_sum, "grad_norm": grad_norm, "tokens": n_tokens}


# ---------------------------------------------------------------------------------------------- data parallel

def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sum_grads(params):
    """Sum gradients over ranks by hand (each rank's loss is already divided by the global normaliser):
    ranks may run different numbers of backward passes, or none, which DDP's hooks do not allow. One
    all_reduce per dtype and device, on the gradients laid end to end (a 7B model's LoRA has ~400 tensors)."""
    if world()[1] == 1:
        return
    buckets = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def comm_device() -> str:
    """Where collective tensors must live: the current GPU under NCCL, the CPU under gloo."""
    return f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"


def all_sum(numbers: list[float]) -> list[float]:
    """Element-wise sum of a short list of numbers over ranks."""
    if world()[1] == 1:
        return list(numbers)
    t = torch.tensor(numbers, dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return [int(x) if float(x).is_integer() else float(x) for x in t.tolist()]


def broadcast_params(params):
    """Every rank takes rank 0's values of params (a freshly initialised adapter)."""
    if world()[1] == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def in_sync(params) -> bool:
    """Do all ranks hold the same values of params? Compares a per-tensor fingerprint (sum and a
    position-weighted sum, in float64, computed where the parameter lives: no copy to the CPU) of every
    rank with rank 0's."""
    if world()[1] == 1:
        return True
    prints = []
    for p in params:
        x = p.detach().flatten().double()
        prints += [x.sum(), (x * torch.arange(1, len(x) + 1, dtype=torch.float64, device=x.device)).sum()]
    mine = torch.stack(prints).to(comm_device())
    everyone = [torch.empty_like(mine) for _ in range(world()[1])]
    dist.all_gather(everyone, mine)
    return all(torch.equal(everyone[0], other) for other in everyone)


def gather(obj) -> list:
    """Every rank's obj, concatenated in rank order (lists) — used for metrics and the failure set."""
    rank, size = world()
    if size == 1:
        return list(obj)
    out = [None] * size
    dist.all_gather_object(out, list(obj))
    return [x for part in out for x in part]
