"""A minimal sampler: the model's forward pass in a loop, with a KV cache.

Why not `model.generate`? Group sampling. GRPO and R3 draw n completions of the same prompt; generate
prefills the prompt n times, we prefill it once and copy its cache n ways. Finished rows are dropped
from the batch, so a long straggler does not keep paying for the short ones.

    python sample.py --prompt "Write a haiku about the sea." --chat --n 2
"""
import argparse
import functools

import torch

import cli
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class SpareCapacityLayer(DynamicLayer):
    """A KV-cache layer that writes new keys/values into preallocated room. HF's DynamicLayer
    concatenates, copying the whole cache at every step; at batch 16 and 600 tokens that is ~0.4 GB
    of copying per step for SmolLM2, as much memory traffic as reading the weights."""

    def __init__(self, spare: int):
        super().__init__()
        self.spare, self.length, self.k_buf, self.v_buf = spare, 0, None, None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self.k_buf is None or self.length + n > self.k_buf.shape[-2]:
            self._resize(self.length + n + self.spare, key_states, value_states)
        self.k_buf[:, :, self.length:self.length + n] = key_states
        self.v_buf[:, :, self.length:self.length + n] = value_states
        self.length += n
        return self._views()

    def _resize(self, capacity, k, v):
        new_k = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
        new_v = v.new_empty(v.shape[0], v.shape[1], capacity, v.shape[3])
        if self.k_buf is not None:
            new_k[:, :, :self.length] = self.k_buf[:, :, :self.length]
            new_v[:, :, :self.length] = self.v_buf[:, :, :self.length]
        self.k_buf, self.v_buf = new_k, new_v

    def _views(self):
        self.keys, self.values = self.k_buf[:, :, :self.length], self.v_buf[:, :, :self.length]
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int):
        self.k_buf, self.v_buf = self.k_buf.repeat_interleave(repeats, 0), self.v_buf.repeat_interleave(repeats, 0)
        self._views()

    def batch_select_indices(self, indices: torch.Tensor):
        self.k_buf, self.v_buf = self.k_buf[indices], self.v_buf[indices]
        self._views()


@torch.inference_mode()
def generate(model, prompts: list[list[int]], *, n: int = 1, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, stop_token_ids=(), seed: int | None = None, pad_token_id: int = 0,
             ignore_stop: bool = False) -> list[list[int]]:
    """Sample n completions of each prompt (lists of token ids, any lengths).

    Returns, prompt-major (the n samples of prompt 0, then of prompt 1, ...), each completion's token
    ids up to and including its first stop token, or max_new_tokens ids. temperature 0 is greedy.
    ignore_stop=True generates exactly max_new_tokens (benchmarks with a fixed length).
    seed: one per prompt (a list), or an int s meaning s + i for prompt i. Every output row draws from
    its own generator, so a row's tokens do not depend on which other rows share the batch.
    """
    device = next(model.parameters()).device
    generators = row_generators(seed, len(prompts), n, device)

    # Prefill each prompt once, left-padded to a common length; position ids count real tokens only.
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    cache = DynamicCache()
    cache.layer_class_to_replicate = functools.partial(SpareCapacityLayer, spare=max_new_tokens)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions(mask),
                   past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    # Then share that prefill among the n samples: repeat the cache, not the work.
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits, mask = logits.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
    rows = torch.arange(len(prompts) * n, device=device)  # which output each live batch row feeds
    outputs: list[list[int]] = [[] for _ in range(len(rows))]
    stops = torch.tensor(sorted(set(stop_token_ids)), device=device, dtype=torch.long)

    for step in range(max_new_tokens):
        next_tokens = pick(logits, temperature, top_p, generators and [generators[r] for r in rows.tolist()])
        for row, tok in zip(rows.tolist(), next_tokens.tolist()):
            outputs[row].append(tok)
        if step == max_new_tokens - 1:
            break
        alive = torch.ones_like(next_tokens, dtype=torch.bool)
        if not ignore_stop and len(stops):
            alive = ~torch.isin(next_tokens, stops)
        if not alive.all():  # drop finished rows from every tensor and from the cache
            if not alive.any():
                break
            keep = alive.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, mask, next_tokens = rows[keep], mask[keep], next_tokens[keep]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        logits = model(input_ids=next_tokens[:, None], attention_mask=mask,
                       position_ids=mask.sum(1, keepdim=True) - 1, past_key_values=cache, use_cache=True).logits[:, -1]
    return outputs


def row_generators(seed, n_prompts: int, n: int, device) -> list | None:
    """One torch.Generator per output row (prompt i, sample j), seeded from the prompt's seed and j."""
    if seed is None:
        return None
    seeds = [seed + i for i in range(n_prompts)] if isinstance(seed, int) else list(seed)
    return [torch.Generator(device=device).manual_seed((s * 1_000_003 + j) % (1 << 63)) for s in seeds for j in range(n)]


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch: 0 at each row's first real token (pads get 1, as HF does)."""
    return (mask.cumsum(1) - 1).clamp(min=0).masked_fill(mask == 0, 1)


def pick(logits: torch.Tensor, temperature: float, top_p: float, generators=None) -> torch.Tensor:
    """Next token per row: argmax at temperature 0, else a draw from the (nucleus-truncated) softmax,
    row i's uniform from generators[i] (or the global RNG when there are none)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token is always kept)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    # Inverse-CDF draw: one uniform per row. torch.multinomial draws an exponential per vocabulary
    # entry, which was 15% of a SmolLM2 decode step on a 2-core CPU.
    cdf = probs.double().cumsum(-1)
    if generators:
        u = torch.cat([torch.rand(1, generator=g, device=probs.device, dtype=torch.float64) for g in generators])
    else:
        u = torch.rand(len(probs), device=probs.device, dtype=torch.float64)
    u = u[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


def validate(args):
    """Flags that would crash the sampler or print nothing: one line before the model loads."""
    import cli
    if not args.prompt.strip():
        raise cli.UsageError("--prompt is empty")
    cli.check_flags([("--n", args.n, args.n >= 1, "at least 1"),
                     ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "at least 1"),
                     ("--temperature", args.temperature, args.temperature >= 0, ">= 0"),
                     ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]")])


def main():
    from model import DEFAULT_MODEL, load_model, stop_token_ids
    p = argparse.ArgumentParser(description="Print sampled completions of a prompt.")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded model, Hub id, local dir or .gguf file")
    p.add_argument("--adapter", default=None, help="a LoRA adapter directory (e.g. runs/x/latest/adapter)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--n", type=int, default=1, help="completions to sample (at least 1)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="at least 1; with the prompt, at most the "
                   "model's context")
    p.add_argument("--temperature", type=float, default=0.8, help=">= 0 (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass, in (0, 1]")
    p.add_argument("--4bit", dest="load_in_4bit", action="store_true", help="load NF4 4-bit weights")
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args()
    validate(args)
    model, tok = load_model(args.model, adapter=args.adapter, load_in_4bit=args.load_in_4bit)
    model.eval()
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
    else:
        ids = tok(args.prompt)["input_ids"]
    context = getattr(model.config, "max_position_embeddings", None)
    if context and len(ids) + args.max_new_tokens > context:
        import cli
        raise cli.UsageError(f"the prompt ({len(ids)} tokens) and --max-new-tokens {args.max_new_tokens} exceed "
                             f"the model's context of {context} tokens")
    outs = generate(model, [list(ids)], n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, stop_token_ids=stop_token_ids(tok), seed=args.seed,
                    pad_token_id=tok.pad_token_id)
    for i, out in enumerate(outs):
        print(f"--- sample {i}\n{tok.decode(out, skip_special_tokens=True)}")


if __name__ == "__main__":
    cli.run(main)
