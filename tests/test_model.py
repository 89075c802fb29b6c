"""model.load_model: the ways a user names a model, and the one-line errors for the wrong ones."""
import subprocess
import sys

import pytest

import model as model_lib
from cli import UsageError
from conftest import ROOT


@pytest.mark.parametrize("name, message", [
    ("/no/such/dir", "unknown model"),
    ("./missing-model", "unknown model"),
    ("/tmp/nothing-here.gguf", "model file not found"),
    ("not-a-model", "unknown model"),
])
def test_bad_names_raise_usage_error(name, message):
    with pytest.raises(UsageError, match=message):
        model_lib.load_model(name)


def test_directory_without_config(tmp_path):
    with pytest.raises(UsageError, match="no config.json"):
        model_lib.load_model(str(tmp_path))


def test_unreachable_hub_is_one_line_exit_2(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "sample.py", "--prompt", "hi", "--model", "someone/no-such-model"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error:") and "Hub" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_lora_wraps_all_linear_layers(tiny_model_dir):
    m, tok = model_lib.load_model(str(tiny_model_dir), lora_r=4, device="cpu")
    lora_targets = {n.split(".")[-1] for n, _ in m.named_modules() if hasattr(_, "lora_A") and n}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= lora_targets
    trainable, total = model_lib.count_parameters(m)
    assert 0 < trainable < total // 2
    assert tok.padding_side == "left" and tok.pad_token_id is not None


def test_embedded_model_loads_with_chat_template(smol):
    m, tok = smol
    assert type(m).__name__ == "LlamaForCausalLM"
    assert 130e6 < sum(p.numel() for p in m.parameters()) < 140e6
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "hi" in text and model_lib.stop_token_ids(tok)
