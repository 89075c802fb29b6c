"""Decode steps without transformers' forward: the sampler's inner loop for Llama and Qwen2 models in float32.

A decode step feeds one token per row: at the batch sizes here it is the model's 211 weight matmuls at
a few rows each, and every row's keys and values read once. transformers' forward adds ~1,500 small
operations around them (per linear, LoRA's two extra matmuls and an add; the 4-D mask; an SDPA kernel
built for many queries). decode_step does the same arithmetic with LoRA merged into the weights (a
copy for this call: the update still trains base + LoRA), q/k/v and gate/up fused into one matmul
each, the weights packed for MKL's GEMM at the batch's row count, and the batch's common prefix (the
system prompt and solved examples: ~256 of ~330 cached tokens) attended once for all rows instead of
once per row. Tested against transformers' forward in tests/test_sample.py; measured in
bench/sample_bench.py and docs/performance.md.

sample.generate calls decoder() once per call and decode_step() once per new token; it falls back to
transformers' forward where decoder() returns None.
"""
from dataclasses import dataclass

import torch

# Decode steps by decode_step (True) or by transformers' forward (False; the benchmarks compare the two).
# Models it does not know (not Llama or Qwen2, not float32, 4-bit, DoRA, ...) always use transformers' forward.
FAST_DECODE = True


@dataclass
class Matrix:
    """A weight decode_step multiplies by: matrix(x) = x @ weight.T, as is, or (on a CPU, in fp32) packed
    for MKL's GEMM at exactly `rows` rows, the op inductor's weight freezing uses for fp32 linears: faster
    at a few rows than a plain matmul (bench/sample_bench.py times both)."""
    weight: torch.Tensor          # packed: a zero-stride stand-in of the weight's shape, never read
    packed: torch.Tensor | None = None
    rows: int = 0

    @classmethod
    def make(cls, weight: torch.Tensor, rows: int) -> "Matrix":
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or not PACK_WEIGHTS or rows > PACK_MAX_ROWS:
            return cls(weight)
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
        return cls(weight.new_zeros(()).expand(weight.shape), packed, rows)  # the weight itself can go

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return x @ self.weight.T
        n = len(x)  # fewer rows than packed for (stopped rows left the batch): padded, else the op would
        x = torch.nn.functional.pad(x, (0, 0, 0, self.rows - n)) if n < self.rows else x  # use .weight
        return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, None, self.rows)[:n]


# MKL-packed weights for decode_step on the CPU (Matrix), for calls of at most PACK_MAX_ROWS rows (an R3
# or GRPO step's 16); False: plain matmuls. Measured (docs/performance.md): at 16 rows a decode step was
# ~20% faster packed; at 32-64 rows not faster, and an eval's peak memory grew by 1.3 GB.
PACK_WEIGHTS = hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight") and torch.backends.mkl.is_available()
PACK_MAX_ROWS = 16


@dataclass
class DecodeLayer:
    norm1: torch.Tensor
    qkv: Matrix                   # [(heads + 2 kv heads) * head dim, hidden]: q, k, v stacked
    qkv_bias: torch.Tensor | None
    o: Matrix
    norm2: torch.Tensor
    gate_up: Matrix               # [2 * intermediate, hidden]: gate, then up
    down: Matrix
    act: object                   # the MLP's activation (SiLU for both families)


@dataclass
class Decoder:
    embed: torch.Tensor
    layers: list[DecodeLayer]
    norm: torch.Tensor
    head: Matrix
    rotary: object                # the model's own rotary embedding module (rope scaling included)
    eps: float
    heads: int
    kv_heads: int
    head_dim: int


def stacked_linear(linears: list) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of the linear layers' outputs stacked (q, k, v: one matmul for three), each layer as it
    computes: its own weight, or a peft LoRA layer's base weight plus each active adapter's
    scaling * B @ A (x (W + s B A)^T = x W^T + s (x A^T) B^T). None where that is not the whole story
    (4-bit weights, DoRA and other variants, a LoRA bias). One layer without an active LoRA: its own
    weight, no copy."""
    parts = []
    for m in linears:
        base = getattr(m, "base_layer", m)
        if type(base) is not torch.nn.Linear:
            return None
        loras = []
        if base is not m and not m.disable_adapters and not m.merged:
            for name in [a for a in m.active_adapters if a in m.lora_A]:
                if name in getattr(m, "lora_variant", {}) or m.lora_B[name].bias is not None:
                    return None
                loras.append((m.lora_B[name].weight, m.lora_A[name].weight, m.scaling[name]))
        parts.append((base, loras))
    if len(parts) == 1 and not parts[0][1]:
        return parts[0][0].weight, parts[0][0].bias
    ref = parts[0][0].weight
    weight = ref.new_empty(sum(base.out_features for base, _ in parts), ref.shape[1])
    start = 0
    for base, loras in parts:
        rows = weight[start:start + base.out_features]
        rows.copy_(base.weight)
        for B, A, scaling in loras:
            rows.addmm_(B.to(rows.dtype), A.to(rows.dtype), alpha=scaling)
        start += base.out_features
    biases = [base.bias for base, _ in parts]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else base.weight.new_zeros(base.out_features) for b, (base, _) in zip(biases, parts)])
    return weight, bias


def decoder(model, rows: int) -> Decoder | None:
    """The weights decode_step reads, made for one generate call of at most `rows` rows; None where it
    does not know the model, or the model is not in float32 (a GPU's bf16: there a decode step is bound
    by kernel launches, and transformers' forward decodes)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    c = base.config
    if not FAST_DECODE or c.model_type not in ("llama", "qwen2") or getattr(c, "use_sliding_window", False) \
            or getattr(c, "pretraining_tp", 1) != 1 or base.get_input_embeddings().weight.dtype != torch.float32:
        return None  # bf16 / fp16: merged into such weights, a LoRA's update would be rounded away
    inner, head_dim = base.model, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    head = stacked_linear([base.lm_head])
    if head is None or head[1] is not None:
        return None
    layers = []
    for layer in inner.layers:  # one layer's merged copies at a time: packed, then freed
        a, m = layer.self_attn, layer.mlp
        qkv, o, gate_up, down = parts = [stacked_linear(x) for x in ([a.q_proj, a.k_proj, a.v_proj], [a.o_proj],
                                                                     [m.gate_proj, m.up_proj], [m.down_proj])]
        if None in parts or any(bias is not None for _, bias in parts[1:]):
            return None
        layers.append(DecodeLayer(layer.input_layernorm.weight, Matrix.make(qkv[0], rows), qkv[1],
                                  Matrix.make(o[0], rows), layer.post_attention_layernorm.weight,
                                  Matrix.make(gate_up[0], rows), Matrix.make(down[0], rows), m.act_fn))
    return Decoder(inner.embed_tokens.weight, layers, inner.norm.weight, Matrix.make(head[0], rows),
                   inner.rotary_emb, c.rms_norm_eps, c.num_attention_heads, c.num_key_value_heads, head_dim)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm, as transformers computes it (in float32, then back)."""
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (rotate-half form)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def decode_step(dec: Decoder, tokens: torch.Tensor, pos: torch.Tensor, cache, mask: torch.Tensor) -> torch.Tensor:
    """Logits [B, vocab] after feeding tokens [B] at positions pos [B, 1], writing their keys and values
    into the cache's next column; mask [B, columns + 1] marks the real slots, the new column included."""
    B, H, KV, D = len(tokens), dec.heads, dec.kv_heads, dec.head_dim
    G, P = H // KV, cache.shared  # query heads per kv head; columns every row holds the same
    h = dec.embed[tokens]
    cos, sin = dec.rotary(h, pos)
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, 1, D]: one position per row, every head
    blocked = ~mask[:, None, None, P:].bool()  # per row, its own slots that are padding
    scale = D ** -0.5
    for layer, kv in zip(dec.layers, cache.layers):
        x = rms_norm(h, layer.norm1, dec.eps)
        qkv = layer.qkv(x) if layer.qkv_bias is None else layer.qkv(x) + layer.qkv_bias
        q, k, v = qkv.split([H * D, KV * D, KV * D], -1)
        q = rotate(q.view(B, H, 1, D), cos, sin).view(B, KV, G, D) * scale
        t = kv.length
        assert t < kv.k_buf.shape[2], "the cache has room for every new token"
        kv.k_buf[:, :, t] = rotate(k.view(B, KV, 1, D), cos, sin)[:, :, 0]
        kv.v_buf[:, :, t] = v.view(B, KV, D)
        kv.length = t + 1
        keys, values = kv._views()
        # scores against each row's own slots; against the common prefix, one matmul per kv head for all rows
        own = (q @ keys[:, :, P:].transpose(2, 3)).masked_fill(blocked, float("-inf"))
        if P:
            q_all = q.transpose(0, 1).reshape(KV, B * G, D)
            common = (q_all @ keys[0, :, :P].transpose(1, 2)).view(KV, B, G, P).transpose(0, 1)
            w = torch.cat([common, own], -1).float().softmax(-1).to(q.dtype)
            o = (w[..., :P].transpose(0, 1).reshape(KV, B * G, P) @ values[0, :, :P]).view(KV, B, G, D)
            o = o.transpose(0, 1) + w[..., P:] @ values[:, :, P:]
        else:
            o = own.float().softmax(-1).to(q.dtype) @ values
        h = h + layer.o(o.reshape(B, H * D))
        x = rms_norm(h, layer.norm2, dec.eps)
        gate, up = layer.gate_up(x).chunk(2, -1)
        h = h + layer.down(layer.act(gate) * up)
    return dec.head(rms_norm(h, dec.norm, dec.eps))
