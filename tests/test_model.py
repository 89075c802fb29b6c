"""model.load_model: the ways a user names a model, and the one-line errors for the wrong ones."""
import subprocess
import sys

import pytest
import torch

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


def test_cpu_layout_keeps_values_logprobs_and_gradients(tiny_model_dir):
    """model.use_cpu_layout stores frozen linear weights [in, out]: the same values, log-probs and LoRA
    gradients as the standard layout (up to a matmul's rounding); LoRA layers and the head are untouched."""
    import rl
    loaded = {}
    for layout in (False, True):
        torch.manual_seed(0)
        loaded[layout] = model_lib.load_model(str(tiny_model_dir), lora_r=4, device="cpu", cpu_layout=layout)
    (plain, tok), (fast, _) = loaded[False], loaded[True]
    changed = [m for n, m in fast.named_modules() if type(m) is torch.nn.Linear and not m.weight.is_contiguous()]
    assert len(changed) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert all(m.weight.t().is_contiguous() for m in changed)
    assert fast.get_output_embeddings().weight.is_contiguous()
    assert all(p.is_contiguous() for n, p in fast.named_parameters() if "lora_" in n)
    for (n, p), (n2, q) in zip(plain.named_parameters(), fast.named_parameters()):
        assert n == n2 and torch.equal(p, q)
    g = torch.Generator().manual_seed(1)
    for m in (plain, fast):
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.05
    samples = [rl.Sample(torch.randint(5, 400, (k,), generator=g).tolist(), [7, 8, 9][:c], 1.0)
               for k, c in ((9, 3), (5, 2))]
    ids, attn, comp = rl.pad_batch(samples, tok.pad_token_id, "cpu")
    out = {}
    for layout, m in ((False, plain), (True, fast)):
        logp = rl.completion_logprobs(m, ids, attn, comp.shape[1])
        (logp * comp).sum().backward()
        out[layout] = (logp.detach(), [p.grad.clone() for n, p in m.named_parameters() if p.requires_grad])
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-5)
    assert len(out[True][1]) == 2 * 7 * 2
    for a, b in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_cpu_layout_can_be_turned_off(tiny_model_dir):
    m, _ = model_lib.load_model(str(tiny_model_dir), device="cpu", cpu_layout=False)
    assert all(p.is_contiguous() for p in m.parameters())
