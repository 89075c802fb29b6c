"""A minimal sampler: the model's forward pass in a loop, with a KV cache.

Why not `model.generate`? It redoes work that our rollouts share:
  - a group: n completions of one prompt prefill it once, and its cache is copied n ways;
  - a common prefix: every Countdown prompt opens with the same system prompt and solved examples
    (~280 of its ~313 tokens); the batch's longest common prefix is prefilled once, at batch 1;
  - the next turn: a finished row can keep its cache (a `Past`), and the conversation's next turn
    (reflection -> retry, attempt -> correction) prefills only the tokens added since.
Stopped rows leave the batch in groups (a quarter of it at a time, one copy of the cache for many), so a
long straggler does not keep paying for the short ones; the host reads one small tensor per decode step.
Decode steps (one new token per row) run in decode.py's decode_step, not transformers' forward, for Llama
and Qwen2 models in float32: the same arithmetic with LoRA merged into packed weights and the batch's
common prefix attended once; prefill always runs transformers' forward.

The batch's cache, one row per sequence, one column per slot:

    [ common prefix | past: left-padded | new prompt tokens: left-padded | sampled tokens ... ]

(the common prefix: the tokens every row's past starts with, the same keys and values in every row).

Pad slots are masked out and position ids count a row's real tokens only, so every row attends to
exactly the keys, at exactly the positions, it would have alone (tests/test_sample.py checks the
tokens against HF generate).

    python sample.py --prompt "Write a haiku about the sea." --chat --n 2
"""
import functools
import hashlib
import os
import random
from dataclasses import dataclass

import torch

import cli  # first: it turns down third-party noise before transformers loads
import decode
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


# KV reuse, the switch, read by rollout (prompts' common prefix prefilled once, a conversation's next
# turn continuing its previous turn's cache) and by rl (the update's common prefix run once). False:
# every prompt is run from scratch (the benchmarks compare the two in one run).
REUSE = True

# The keys and values one sampler call may hold (rollout.sample_turns splits its prompts to fit): wide
# decode batches cost little more per step than narrow ones (each step reads every weight once), so the
# failure set and the evals run as many rows at once as this allows. 2 GiB: ~120 Countdown rows of the
# embedded model (fp32), ~48 rows of 1,536 tokens of Qwen2.5-1.5B in bf16.
KV_BUDGET_BYTES = 2 * 2**30


def prompts_per_call(model, prompts: list[list[int]], max_new_tokens: int, n: int = 1) -> int:
    """How many of `prompts` (each sampled n times, up to max_new_tokens) fit in KV_BUDGET_BYTES."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    per_token = 2 * c.num_hidden_layers * kv_heads * head_dim * next(model.parameters()).element_size()
    per_prompt = per_token * n * (max(map(len, prompts), default=1) + max_new_tokens)
    return max(1, KV_BUDGET_BYTES // per_prompt)


@dataclass
class Past:
    """The keys and values of one sequence, `ids`, per layer ([1, kv heads, len(ids), head dim] each):
    what a later call needs to go on from the end of `ids` without running them again."""
    ids: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


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

    @classmethod
    def from_pasts(cls, pasts: list[Past | None], layer: int, shared: int, width: int, room: int, spare: int):
        """Layer `layer` of a batch whose row i starts as pasts[i]: the `shared` tokens all pasts start with
        in columns [0, shared) of every row (row 0's keys and values: the same tokens, so the same numbers
        up to float rounding; decode_step reads them once for the whole batch), then the rest of each past
        right-aligned at column `width` (the zeros between are pad slots), then `room` free columns. A
        row without a past (then shared is 0) is all pad slots up to `width`."""
        ref = next(p for p in pasts if p is not None).keys[layer]
        self = cls(spare)
        self.lazy_initialization(ref, ref)
        shape = (len(pasts), ref.shape[1], width + room, ref.shape[3])
        self.k_buf, self.v_buf, self.length = ref.new_zeros(shape), ref.new_zeros(shape), width
        if shared:
            self.k_buf[:, :, :shared] = pasts[0].keys[layer][0, :, :shared]
            self.v_buf[:, :, :shared] = pasts[0].values[layer][0, :, :shared]
        for i, p in enumerate(pasts):  # one copy per row: each row writes its own tokens after it
            if p is None:
                continue
            self.k_buf[i, :, width - len(p.ids) + shared:width] = p.keys[layer][0, :, shared:]
            self.v_buf[i, :, width - len(p.ids) + shared:width] = p.values[layer][0, :, shared:]
        self._views()
        return self


def prefill(model, prompts: list[list[int]], pasts: list[Past | None], pad_token_id: int, spare: int):
    """Run each prompt's tokens after its past (all of them where the past is None), the new tokens
    left-padded to a common width. Returns (cache, attention mask, logits at each prompt's end); the
    cache's `shared` first columns are the tokens every row's past starts with (SpareCapacityLayer.from_pasts)."""
    device = next(model.parameters()).device
    done = [len(p.ids) if p is not None else 0 for p in pasts]
    news = [list(prompt[d:]) for prompt, d in zip(prompts, done)]
    assert all(news) and all(p is None or list(q[:len(p.ids)]) == p.ids for p, q in zip(pasts, prompts))
    with_past = all(p is not None for p in pasts)
    shared = len(os.path.commonprefix([p.ids for p in pasts])) if with_past else 0
    width, new_width = max(done), max(map(len, news))
    ids = torch.tensor([[pad_token_id] * (new_width - len(s)) + s for s in news], device=device)
    mask = torch.tensor([[1] * shared + [0] * (width - d) + [1] * (d - shared) + [0] * (new_width - len(s)) + [1] * len(s)
                         for d, s in zip(done, news)], device=device)
    cache = DynamicCache()
    cache.layer_class_to_replicate = functools.partial(SpareCapacityLayer, spare=spare)
    if width:  # the cache starts as the pasts
        n_layers = len(next(p for p in pasts if p is not None).keys)
        cache.layers = [SpareCapacityLayer.from_pasts(pasts, i, shared, width, new_width + spare, spare)
                        for i in range(n_layers)]
    cache.shared = shared
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)[:, width:],
                   cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    return cache, mask, logits


def trim_past(past: Past | None, prompt: list[int]) -> Past | None:
    """The part of `past` that `prompt` starts with, leaving the prompt at least one token of its own;
    None if they share nothing. Attention is causal, so a prefix's keys and values are the start of the
    longer sequence's: a next turn whose template re-tokenizes the end of a reply differently still
    reuses everything before the first differing token (views, no copy)."""
    if past is None:
        return None
    shared = min(len(os.path.commonprefix([past.ids, list(prompt)])), len(prompt) - 1)
    if shared == len(past.ids):
        return past
    if shared == 0:
        return None
    return Past(past.ids[:shared], [k[:, :, :shared] for k in past.keys], [v[:, :, :shared] for v in past.values])


def common_prefix_len(prompts: list[list[int]]) -> int:
    """Length of the prompts' longest common prefix, leaving every prompt at least one token of its own
    (its logits start what follows). Used by generate and by rl.shared_prompt_logprobs."""
    return min(len(os.path.commonprefix(prompts)), min(map(len, prompts)) - 1)


def row_past(cache, mask_row: torch.Tensor, row: int, ids: list[int]) -> Past:
    """Batch row `row`'s cache as a Past of `ids`: its real slots only (pads dropped), copied out."""
    real = mask_row.nonzero().squeeze(1)
    assert len(real) == len(ids), "the row's real slots are its ids"
    return Past(list(ids), [layer.keys[row:row + 1, :, real] for layer in cache.layers],
                [layer.values[row:row + 1, :, real] for layer in cache.layers])


def mix_seed(*parts: int) -> int:
    """One 63-bit seed from several integers: (run seed, step, row) for a row, (seed, j) for stream j under
    it (sample j of a prompt, retry j of an attempt). A hash, the same on every rank and run, so nearby
    inputs give unrelated streams."""
    text = "/".join(str(int(p)) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


@torch.inference_mode()
def generate(model, prompts: list[list[int]], *, n: int = 1, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, stop_token_ids=(), seed: int | list[int] | None = None, pad_token_id: int = 0,
             ignore_stop: bool = False, past: list[Past | None] | None = None, share_prefix: bool = True,
             keep: bool = False, on_tokens=None):
    """Sample n completions of each prompt (lists of token ids, any lengths).

    Returns, prompt-major (the n samples of prompt 0, then of prompt 1, ...), each completion's token
    ids up to and including its first stop token, or max_new_tokens ids. temperature 0 is greedy.
    ignore_stop=True generates exactly max_new_tokens (benchmarks with a fixed length).

    seed: one per prompt, or an int s (prompt i gets s + i), or None (torch's global generator).
      Sample j of prompt i draws from its own stream, random.Random(mix_seed(seed_i, j)), so its
      tokens do not depend on which other rows share the batch (up to float rounding).
    past: per prompt, None or a Past whose ids the prompt starts with (a previous turn, kept with
      keep=True); only the prompt's tokens after it are run.
    share_prefix: without a past, prefill the prompts' longest common prefix once, at batch 1.
    keep: return (completions, pasts), pasts[k] being completion k's Past: its prompt and its tokens
      but the last (sampled, never fed), ready for the conversation's next turn. Otherwise stopped
      rows' caches are freed when they leave the batch.
    on_tokens: called with the number of tokens sampled at each step (a progress bar's update).
    """
    device = next(model.parameters()).device
    if past is None:
        past = [None] * len(prompts)
        # The common prefix, leaving every prompt one token of its own (its logits start the sampling).
        shared = common_prefix_len(prompts)
        if share_prefix and len(prompts) > 1 and shared > 0:
            cache, mask, _ = prefill(model, [prompts[0][:shared]], [None], pad_token_id, 0)
            past = [row_past(cache, mask[0], 0, prompts[0][:shared])] * len(prompts)
    cache, mask, logits = prefill(model, prompts, past, pad_token_id, max_new_tokens)
    dec = decode.decoder(model, len(prompts) * n) if max_new_tokens > 1 else None

    # Then share each prompt's prefill among its n samples: repeat the cache, not the work.
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits, mask = logits.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
    B = len(prompts) * n
    # The loop's state lives on the model's device; the host reads one small tensor per step (which rows
    # stopped), so a GPU's queue never waits on Python. rows[k]: the output that batch row k feeds.
    rows, rows_t = list(range(B)), torch.arange(B, device=device)
    tokens = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    lengths = [max_new_tokens] * B                       # each output's length, set when it stops
    live = torch.ones(B, dtype=torch.bool, device=device)  # per batch row: still sampling
    n_live, n_dead = B, 0                                 # host copies: live rows, stopped rows still in the batch
    kept: list[Past | None] = [None] * B
    stops = torch.tensor(sorted(set(stop_token_ids)) if not ignore_stop else [], device=device, dtype=torch.long)
    # The whole mask and the position ids, preallocated: a decode step writes one column and adds one.
    width = mask.shape[1]
    mask = torch.cat([mask, mask.new_zeros(B, max_new_tokens)], 1)
    pos = mask.sum(1, keepdim=True) - 1
    u_all = None
    if temperature != 0 and seed is not None:  # every uniform a row can need, drawn from its own stream
        seeds = seed if isinstance(seed, list) else [seed + i for i in range(len(prompts))]
        assert len(seeds) == len(prompts), "one seed per prompt"
        streams = [random.Random(mix_seed(s, j)) for s in seeds for j in range(n)]
        u_all = torch.tensor([[r.random() for _ in range(max_new_tokens)] for r in streams], dtype=torch.float64,
                             device=device)

    for step in range(max_new_tokens):
        u = None
        if temperature != 0:  # one uniform per batch row: its stream's draw for this step
            u = torch.rand(len(rows), dtype=torch.float64, device=device) if u_all is None else u_all[rows_t, step]
        next_tokens = pick(logits, temperature, top_p, u)
        tokens[rows_t, step] = next_tokens
        stopped = live & torch.isin(next_tokens, stops) if step < max_new_tokens - 1 else live
        if on_tokens is not None:
            on_tokens(n_live)
        newly = stopped.nonzero().squeeze(1).tolist()  # the step's one host sync
        for k in newly:
            lengths[rows[k]] = step + 1
        n_live, n_dead = n_live - len(newly), n_dead + len(newly)
        if n_live == 0:
            if keep:  # every row still in the batch has stopped
                keep_pasts(kept, cache, mask, rows, list(range(len(rows))), prompts, tokens, lengths, n, width + step)
            break
        live &= ~stopped
        # Stopped rows stay in the batch (their new slots masked out) until a quarter of it has stopped:
        # then they leave all at once, one copy of the cache for many finishes.
        if n_dead * 4 >= len(rows):
            gone, alive = (~live).nonzero().squeeze(1), live.nonzero().squeeze(1)
            if keep:
                keep_pasts(kept, cache, mask, rows, gone.tolist(), prompts, tokens, lengths, n, width + step)
            cache.batch_select_indices(alive)
            alive_list = alive.tolist()
            rows, rows_t = [rows[k] for k in alive_list], rows_t[alive]
            mask, pos, live, next_tokens = mask[alive], pos[alive], live[alive], next_tokens[alive]
            n_dead = 0
        mask[:, width + step] = live
        pos = pos + live[:, None]
        if dec is not None:
            logits = decode.decode_step(dec, next_tokens, pos, cache, mask[:, :width + step + 1])
        else:
            logits = model(input_ids=next_tokens[:, None], attention_mask=mask[:, :width + step + 1],
                           position_ids=pos, cache=cache, use_cache=True).logits[:, -1]
    outputs = [row[:length] for row, length in zip(tokens.tolist(), lengths)]
    return (outputs, kept) if keep else outputs


def keep_pasts(kept, cache, mask, rows, ks, prompts, tokens, lengths, n, used):
    """The caches of stopped batch rows `ks`, as Pasts of their prompt and sampled tokens but the last
    (the stop token, sampled but never attended to): mask[:, :used] marks each row's real slots."""
    outs = tokens[[rows[k] for k in ks]].tolist() if ks else []
    for k, out in zip(ks, outs):
        r = rows[k]
        kept[r] = row_past(cache, mask[k, :used], k, list(prompts[r // n]) + out[:lengths[r] - 1])


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch: 0 at each row's first real token (pads get 1, as HF does)."""
    return (mask.cumsum(1) - 1).clamp(min=0).masked_fill(mask == 0, 1)


def pick(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor | None) -> torch.Tensor:
    """Next token per row: argmax at temperature 0, else a draw from the (nucleus-truncated) softmax,
    u being one uniform in [0, 1) per row."""
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
    # entry, which was 15% of a SmolLM2 decode step on a 2-core CPU. In two levels: the cumulative mass
    # of blocks of 1,024 tokens, then the cumulative sum inside the one block the uniform falls in (a
    # cumulative sum over the whole vocabulary in float64 was 8 ms of a 95 ms step at 16 rows).
    B, V = probs.shape
    blocks = torch.nn.functional.pad(probs, (0, (-V) % 1024)).view(B, -1, 1024)
    cdf = blocks.sum(-1, dtype=torch.float64).cumsum(-1)  # [B, blocks]
    target = u.to(probs.device)[:, None] * cdf[:, -1:]
    block = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[1] - 1)  # [B, 1]
    below = torch.where(block > 0, cdf.gather(1, (block - 1).clamp(min=0)), 0.0)  # the mass before it
    inside = blocks.gather(1, block[:, :, None].expand(-1, -1, 1024))[:, 0].double().cumsum(-1)
    at = torch.searchsorted(inside, target - below, right=True)
    last = (inside < inside[:, -1:]).sum(-1, keepdim=True)  # the block's last token with mass: where rounding
    return (block * 1024 + torch.minimum(at, last)).squeeze(1)  # puts the target past the block's sum


def validate(args):
    """Flags that would crash the sampler or print nothing: one line before the model loads."""
    if not args.prompt.strip():
        raise cli.UsageError("--prompt is empty")
    cli.check_flags([("--n", args.n, args.n >= 1, "at least 1"),
                     ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "at least 1"),
                     ("--temperature", args.temperature, args.temperature >= 0, ">= 0"),
                     ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]")])


def main():
    from model import DEFAULT_MODEL, chat_prompt_ids, load_model, resolve_adapter, stop_token_ids
    p = cli.ArgumentParser(description="Print sampled completions of a prompt.")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded model, Hub id, local dir or .gguf file")
    p.add_argument("--adapter", default=None, help="a run directory (its latest checkpoint, e.g. runs/countdown-r3), "
                   "a checkpoint directory or an adapter directory")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--n", type=int, default=1, help="completions to sample (at least 1)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="at least 1; with the prompt, at most the "
                   "model's context")
    p.add_argument("--temperature", type=float, default=0.8, help=">= 0 and finite (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass, in (0, 1]")
    p.add_argument("--4bit", dest="load_in_4bit", action="store_true", help="load NF4 4-bit weights")
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args()
    cli.check_not_empty(p, args)
    validate(args)
    # the same run/checkpoint/adapter directories as eval.py and export.py, found before the model loads
    adapter = str(resolve_adapter(args.adapter)) if args.adapter is not None else None
    model, tok = load_model(args.model, adapter=adapter, load_in_4bit=args.load_in_4bit)
    model.eval()
    if args.chat:
        ids = chat_prompt_ids(tok, [{"role": "user", "content": args.prompt}])
    else:
        ids = tok(args.prompt)["input_ids"]
    context = getattr(model.config, "max_position_embeddings", None)
    if context and len(ids) + args.max_new_tokens > context:
        raise cli.UsageError(f"the prompt ({len(ids)} tokens) and --max-new-tokens {args.max_new_tokens} exceed "
                             f"the model's context of {context} tokens")
    outs = generate(model, [list(ids)], n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, stop_token_ids=stop_token_ids(tok, model.generation_config), seed=args.seed,
                    pad_token_id=tok.pad_token_id)
    for i, out in enumerate(outs):
        print(f"--- sample {i}\n{tok.decode(out, skip_special_tokens=True)}")


if __name__ == "__main__":
    cli.run(main)
