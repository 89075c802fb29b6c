"""Shared fixtures: a tiny randomly initialised Llama (unit tests) and the embedded SmolLM2 (end-to-end)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_tiny_model_dir(path: Path) -> Path:
    """A 2-layer Llama with the embedded tokenizer, saved as a normal HF directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    import model as model_lib
    tok = AutoTokenizer.from_pretrained(model_lib.embedded_model_dir())
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=False, initializer_range=0.2)  # varied, not repetitive, greedy text
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    import model as model_lib
    m, tok = model_lib.load_model(str(tiny_model_dir), device="cpu")
    m.eval()
    return m, tok


@pytest.fixture(scope="session")
def smol():
    import model as model_lib
    m, tok = model_lib.load_model(device="cpu")
    m.eval()
    return m, tok
