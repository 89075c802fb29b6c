"""A model of a given shape with random weights, saved as a normal HF model directory, for speed and
memory benchmarks where no real checkpoint can be downloaded (no network on the GPU machines).

The config is a JSON dict (bench/<name>.json, e.g. qwen2.5-1.5b: Qwen2.5-1.5B's shape) or "tiny" (a
2-layer Qwen2, for dry runs). The tokenizer is the embedded SmolLM2's (or --tokenizer DIR): it only
makes token ids, all of which (< 49152) are valid ids of these vocabularies; a random model's own ids
beyond the tokenizer decode to nothing, which is fine when only speed is measured.
"""
import json
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TINY = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152,
        "tie_word_embeddings": True, "rope_theta": 1e6, "max_position_embeddings": 4096, "initializer_range": 0.2}


def load_config_dict(name: str) -> dict:
    if name == "tiny":
        return dict(TINY)
    path = Path(name) if Path(name).suffix == ".json" else HERE / f"{name}.json"
    if not path.exists():
        raise SystemExit(f"no model config {path} (known: tiny, "
                         f"{', '.join(p.stem for p in sorted(HERE.glob('*.json')))})")
    return json.loads(path.read_text())


def build(name: str, out_dir, tokenizer_dir=None, device="cpu", dtype=torch.bfloat16, seed: int = 0) -> Path:
    """Write a random-weights model of config `name` (+ tokenizer) to out_dir; return out_dir."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    if tokenizer_dir is None:
        import model as model_lib
        tokenizer_dir = model_lib.embedded_model_dir()
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = load_config_dict(name)
    if len(tok) > cfg["vocab_size"]:
        raise SystemExit(f"the tokenizer's {len(tok)} ids do not fit the vocabulary of {cfg['vocab_size']}")
    config = AutoConfig.for_model(**cfg)
    # the tokenizer's special ids, so that padding and stop tokens agree with the ids we feed
    config.bos_token_id, config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    return out
