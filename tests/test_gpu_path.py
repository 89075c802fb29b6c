"""The GPU user's path, checked on the CPU: checkpoints from another device layout, device choice under
torchrun, chat templates that refuse a system turn, stop tokens, chunked log-probs, activation
checkpointing, token-capped micro-batches, the data-parallel helpers, and no import circle."""
import ast
import io

import pytest
import torch

import rundir
from conftest import ROOT


# ---------------------------------------------------------------------------------------------- imports

def imports_of(path) -> set[str]:
    """Our top-level modules that a file imports anywhere (module level or inside functions)."""
    ours = {p.stem for p in ROOT.glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & ours - {path.stem}


def test_no_import_circle_among_the_top_level_files():
    graph = {p.stem: imports_of(p) for p in ROOT.glob("*.py")}
    state = {}  # 1: on the current path, 2: done

    def visit(name, path):
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join(path + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2
    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert graph["model"] <= {"cli", "rundir"}, graph["model"]


# ---------------------------------------------------------------------------------------------- checkpoints

def saved_as_if_on(device: str, obj, path):
    """torch.save with every storage tagged as living on `device` (what a GPU run writes): loading it
    without a map_location on a machine without that device raises."""
    import torch.serialization as ser
    tag = ser.location_tag
    ser.location_tag = lambda storage: device
    try:
        torch.save(obj, path)
    finally:
        ser.location_tag = tag


def test_a_checkpoint_from_another_device_layout_resumes(tiny_model_dir, tmp_path):
    import model as model_lib
    m, _ = model_lib.load_model(str(tiny_model_dir), lora_r=4, device="cpu")
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    m(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    ckpt = rundir.save_checkpoint(tmp_path, m, opt, {"step": 3})
    want = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    # the optimizer's tensors tagged cuda:1, and the CUDA RNG states of 8 GPUs (an older checkpoint's layout)
    saved_as_if_on("cuda:1", opt.state_dict(), ckpt / "optimizer.pt")
    rng = torch.load(ckpt / "rng.pt", weights_only=False)
    rng["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 8
    saved_as_if_on("cuda:0", rng, ckpt / "rng.pt")
    with pytest.raises(RuntimeError, match="CUDA"):  # the simulation holds: a plain load refuses
        torch.load(ckpt / "optimizer.pt", weights_only=False)
    torch.manual_seed(123)  # moved on since the save
    fresh = torch.optim.AdamW(params, lr=1e-3)
    assert rundir.latest_checkpoint(tmp_path) == ckpt
    state = rundir.load_checkpoint(ckpt, m, fresh)
    assert state["step"] == 3
    got = fresh.state_dict()["state"][0]
    assert all(torch.equal(got[k].cpu(), want[k]) and got[k].device == params[0].device or k == "step"
               for k in want)
    assert torch.equal(torch.get_rng_state(), rng["torch"])  # the checkpoint's CPU RNG state is back


# ---------------------------------------------------------------------------------------------- devices

@pytest.mark.parametrize("gpus, local_rank, want", [(0, 0, "cpu"), (0, 1, "cpu"), (2, 1, "cuda:1"),
                                                     (1, 0, "cuda:0"), (1, 1, "cuda:0"), (1, 3, "cuda:0")])
def test_each_rank_gets_a_device_it_can_see(gpus, local_rank, want, monkeypatch):
    """A GPU stand-in: a launcher that gives each process one GPU shows it as cuda:0, whatever LOCAL_RANK."""
    import loop
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert loop.rank_device(local_rank) == want


def test_the_rank_tests_hide_cuda():
    from test_train import on_the_cpu
    assert on_the_cpu({"A": "1"}) == {"A": "1", "CUDA_VISIBLE_DEVICES": ""}


# ---------------------------------------------------------------------------------------------- chat templates

NO_SYSTEM_TEMPLATE = (  # Gemma-2's rule: no system role; turns alternate user / assistant
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


def fresh_tokenizer(model_dir, template):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("task", ["countdown", "math"])
def test_a_template_that_refuses_a_system_turn_gets_it_in_the_first_user_turn(task, tiny_model_dir):
    import rollout
    import tasks
    tok = fresh_tokenizer(tiny_model_dir, NO_SYSTEM_TEMPLATE)
    example = tasks.load_examples(task, "test", n=1, seed=0)[0]
    messages = tasks.first_attempt_messages(task, example)
    assert messages[0]["role"] == "system"
    with pytest.raises(Exception, match="System role"):
        tok.apply_chat_template(messages, tokenize=False)
    text = tok.decode(rollout.chat_ids(tok, messages))
    first_user = f"<user>{messages[0]['content']}\n\n{messages[1]['content']}</s>"
    assert text.startswith(first_user) and text.endswith("<assistant>")
    assert text.count("<user>") == sum(m["role"] == "user" for m in messages)


def test_a_tokenizer_without_a_chat_template_is_one_line(tiny_model_dir, tmp_path, capsys):
    import json
    import shutil

    import train_r3
    from test_errors import fails_with_one_line, train_args
    base = tmp_path / "base-model"
    shutil.copytree(tiny_model_dir, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    line = fails_with_one_line(train_r3.main, train_args(base, tmp_path / "run", "--steps", "1"), capsys)
    assert "no chat template" in line


# ---------------------------------------------------------------------------------------------- stop tokens

def test_stop_tokens_include_the_generation_configs_eos_ids(tiny_model_dir, monkeypatch):
    """A Llama-3-like model: its generation config ends a turn on ids the tokenizer's EOS is not."""
    from transformers import AutoTokenizer, GenerationConfig

    import model as model_lib
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    plain = model_lib.stop_token_ids(tok)
    extra = [i for i in (7, 11, 13) if i not in plain][:2]
    assert len(extra) == 2
    for eos in (extra, extra[0]):  # a list (Llama-3), or one id
        got = model_lib.stop_token_ids(tok, GenerationConfig(eos_token_id=eos))
        assert set(got) == set(plain) | set(extra if isinstance(eos, list) else [eos])
    m, _ = model_lib.load_model(str(tiny_model_dir), device="cpu")
    m.generation_config.eos_token_id = extra
    import rollout
    seen = {}
    real = rollout.generate

    def spy(*a, **kw):
        seen["stops"] = kw["stop_token_ids"]
        return real(*a, **kw)
    monkeypatch.setattr(rollout, "generate", spy)
    rollout.sample_turns(m, tok, [[{"role": "user", "content": "hi"}]], rollout.Gen(2, temperature=0))
    assert set(extra) <= set(seen["stops"])  # the sampler is given them


# ---------------------------------------------------------------------------------------------- log-probs

@pytest.mark.parametrize("dtype, temperature", [(torch.float32, 1.0), (torch.float32, 0.7), (torch.bfloat16, 1.3),
                                                (torch.float32, 0.0)])
def test_chunked_logprobs_equal_the_plain_ones_and_their_gradients(dtype, temperature):
    import rl
    torch.manual_seed(0)
    full = (torch.randn(3, 12, 50) * 3).to(dtype).requires_grad_()
    logits = full[:, :-1]  # a view, as the callers pass
    targets = torch.randint(0, 50, (3, 11))
    weights = torch.randn(3, 11)
    got = rl.token_logprobs(logits, targets, temperature, chunk=4)  # chunks of 4, 4 and 3 answer tokens
    (got * weights).sum().backward()
    grad_got, full.grad = full.grad.clone(), None
    T = temperature or 1.0
    want = torch.log_softmax(logits.float() / T, -1).gather(-1, targets[..., None]).squeeze(-1)
    (want * weights).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=tol, rtol=tol)
    assert torch.allclose(grad_got.float(), full.grad.float(), atol=tol, rtol=tol)
    assert grad_got[:, -1].abs().sum() == 0 and grad_got.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- the update's memory

def lora_model(model_dir, load_in_4bit=False):
    """The tiny model with LoRA whose B matrices are random too (a fresh adapter's are zero: no gradient to A)."""
    import model as model_lib
    torch.manual_seed(0)
    m, tok = model_lib.load_model(str(model_dir), lora_r=4, device="cpu", load_in_4bit=load_in_4bit)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    m.train()
    return m, tok


def some_samples(n=6):
    import rl
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(5, 1000, (9,), generator=g).tolist()
    return [rl.Sample(shared + torch.randint(5, 1000, (k % 3,), generator=g).tolist(),
                      torch.randint(5, 1000, (3 + 2 * k,), generator=g).tolist(), float(k % 3) - 1.0)
            for k in range(n)]


def update_grads(m, tok, samples, **cfg):
    import rl
    params = [p for p in m.parameters() if p.requires_grad]
    weights = {w.untyped_storage().data_ptr() for w in m.parameters()}
    saved = []

    vocab = m.config.vocab_size

    def keep(t):  # the decoder's activations saved for backward (weights and the [.., vocab] logits aside)
        if t.untyped_storage().data_ptr() not in weights and (t.dim() == 0 or t.shape[-1] != vocab):
            saved.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        rl.update(m, torch.optim.SGD(params, lr=0.0), samples, rl.UpdateConfig(**cfg), tok.pad_token_id)
    return [p.grad.clone() for p in params], sum(saved)


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["unquantised", "4bit"])
def test_activation_checkpointing_gives_the_same_gradients_in_less_memory(load_in_4bit, tiny_model_dir):
    import model as model_lib
    samples = some_samples()
    m, tok = lora_model(tiny_model_dir, load_in_4bit)
    plain, plain_saved = update_grads(m, tok, samples, micro_batch=4)
    model_lib.activation_checkpointing(m)
    assert m.is_activation_checkpointing
    ckpt, ckpt_saved = update_grads(m, tok, samples, micro_batch=4)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(plain, ckpt))
    assert any(a.abs().sum() > 0 for a in plain)
    assert ckpt_saved < plain_saved / 2, (ckpt_saved, plain_saved)


def test_micro_batches_are_capped_in_tokens():
    import rl
    s = lambda p, c: rl.Sample([1] * p, [2] * c, 0.0)  # noqa: E731
    samples = [s(10, 5), s(10, 5), s(10, 20), s(2, 3), s(2, 3), s(50, 50)]
    sizes = lambda chunks: [len(c) for c in chunks]  # noqa: E731
    assert sizes(rl.micro_batches(samples, 8)) == [6]
    assert sizes(rl.micro_batches(samples, 4)) == [4, 2]
    # 60 padded tokens: 2 x 15 fit, a third row would make 3 x 30; then 2 x 30 fit (the short row padded to
    # the long one), a third would not; 100 tokens of one sample go alone
    chunks = rl.micro_batches(samples, 8, max_tokens=60)
    assert sizes(chunks) == [2, 2, 1, 1]
    assert all(len(c) * (max(len(x.prompt_ids) for x in c) + max(len(x.completion_ids) for x in c)) <= 60
               for c in chunks if len(c) > 1)
    assert [x for c in chunks for x in c] == samples  # the order is kept: the normaliser sees every sample


def test_a_token_cap_gives_the_same_update(tiny_model_dir):
    samples = some_samples()
    m, tok = lora_model(tiny_model_dir)
    whole, _ = update_grads(m, tok, samples, micro_batch=8)
    capped, _ = update_grads(m, tok, samples, micro_batch=8, micro_batch_tokens=40)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(whole, capped))


# ---------------------------------------------------------------------------------------------- eval --4bit

def test_an_adapter_trained_in_4bit_is_scored_on_the_4bit_base(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import json

    import eval as ev
    import model as model_lib
    import tasks
    from verifiers import Verdict
    run = tmp_path / "run"
    m, _ = model_lib.load_model(str(tiny_model_dir), lora_r=4, load_in_4bit=True, device="cpu")
    m.save_pretrained(run / "ckpt-000001" / "adapter")
    (run / "latest").write_text("ckpt-000001")
    (run / "args.json").write_text(json.dumps({"load_in_4bit": "True", "model": str(tiny_model_dir)}))
    loaded = []
    real = model_lib.load_model

    def spy(*a, **kw):
        out = real(*a, **kw)
        loaded.append((kw.get("load_in_4bit"), any("Linear4bit" in type(x).__name__ for x in out[0].modules())))
        return out
    monkeypatch.setattr(model_lib, "load_model", spy)
    monkeypatch.setattr(tasks, "verify", lambda task, text, ex: Verdict(False, "format"))
    argv = ["--task", "countdown", "--model", str(tiny_model_dir), "--n", "1", "--max-new-tokens", "2",
            "--reflect-tokens", "2", "--adapter", str(run)]
    ev.main([*argv, "--out", str(tmp_path / "auto")])
    assert loaded == [(True, True)] and "scoring it with --4bit" in capsys.readouterr().out
    summary = json.loads(next((tmp_path / "auto").glob("summary-*.json")).read_text())
    assert summary["configs"]["trained"]["load_in_4bit"] is True
    (run / "args.json").write_text(json.dumps({"model": str(tiny_model_dir)}))  # trained in bf16: the flag
    ev.main([*argv, "--4bit", "--out", str(tmp_path / "flag")])
    ev.main([*argv, "--out", str(tmp_path / "plain")])
    assert loaded[1:] == [(True, True), (False, False)]


# ---------------------------------------------------------------------------------------------- loading and export

def test_bf16_only_where_the_gpu_does_it_natively(monkeypatch):
    import model as model_lib
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert model_lib.pick_dtype(cuda) == torch.float32  # Turing/Volta: bf16 only through emulation
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert model_lib.pick_dtype(cuda) == torch.bfloat16
    assert model_lib.pick_dtype(torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("device, want", [("cuda:1", {"": torch.device("cuda:1")}), ("cpu", None)])
def test_a_gpu_model_loads_straight_onto_the_gpu(device, want, tiny_model_dir, monkeypatch):
    import transformers

    import model as model_lib
    seen = {}

    class Stop(Exception):
        pass

    def from_pretrained(*a, **kw):
        seen.update(kw)
        raise Stop
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(Stop):
        model_lib.load_model(str(tiny_model_dir), device=device, dtype="bfloat16")
    assert seen.get("device_map") == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_merges_in_fp32_from_a_base_in_the_output_dtype(dtype, tiny_model_dir, tmp_path, monkeypatch):
    """With --dtype the checkpoint's own dtype, the merged weights are the fp32 merge rounded once, exactly."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import export
    import model as model_lib
    from test_user import trained_adapter
    base_dir = tmp_path / "base"  # the tiny checkpoint in this dtype
    AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=dtype).save_pretrained(base_dir)
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(base_dir)
    adapter = trained_adapter(base_dir, tmp_path / "adapter")
    dtypes = []
    real = model_lib.load_model
    monkeypatch.setattr(model_lib, "load_model", lambda *a, **kw: dtypes.append(kw["dtype"]) or real(*a, **kw))
    out = export.export(adapter, tmp_path / "merged", dtype=dtype, device="cpu")
    assert dtypes == [dtype]  # no fp32 copy of a 16-bit model
    got = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    ref, _ = real(str(base_dir), adapter=str(adapter), device="cpu", dtype=torch.float32)
    want = {k: v.to(dtype) for k, v in ref.merge_and_unload().state_dict().items()}  # the fp32 merge, rounded
    assert got.keys() == want.keys() and all(v.dtype == dtype for v in got.values())
    before = real(str(base_dir), device="cpu", dtype=dtype)[0].state_dict()
    assert any(not torch.equal(before[k], got[k]) for k in got)  # the merge changed the weights
    assert all(torch.equal(got[k], want[k]) for k in got)


# ---------------------------------------------------------------------------------------------- data parallel

def test_gradients_are_summed_over_ranks_in_one_call(monkeypatch):
    """Two ranks simulated: the other rank's gradients equal ours, so the sum doubles them."""
    import rl
    calls = []

    def all_reduce(t):
        calls.append(t.numel())
        t.mul_(2)
    monkeypatch.setattr(rl, "world", lambda: (0, 2))
    monkeypatch.setattr(rl.dist, "all_reduce", all_reduce)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5)),
              torch.nn.Parameter(torch.randn(2, 2))]
    params[0].grad, params[1].grad = torch.randn(3, 4), torch.randn(5)  # the third ran no backward here
    before = [p.grad.clone() for p in params[:2]]
    rl.sum_grads(params)
    assert calls == [12 + 5 + 4]
    assert torch.equal(params[0].grad, 2 * before[0]) and torch.equal(params[1].grad, 2 * before[1])
    assert torch.equal(params[2].grad, torch.zeros(2, 2))


# ---------------------------------------------------------------------------------------------- requirements

def test_the_installed_packages_are_in_the_tested_ranges():
    """The suite runs on what requirements*.txt allow: a green run says those ranges were tested."""
    import importlib.metadata

    from packaging.requirements import Requirement
    for name in ("requirements.txt", "requirements-dev.txt"):
        for line in (ROOT / name).read_text().splitlines():
            spec = line.split("#")[0].strip()
            if spec:
                req = Requirement(spec)
                version = importlib.metadata.version(req.name).split("+")[0]
                assert req.specifier.contains(version), f"{name}: {req.name} {version} is not in {req.specifier}"
                assert "<" in str(req.specifier) or "==" in str(req.specifier), f"{name}: {spec} has no upper bound"


def test_the_training_flags_reach_the_model_and_the_update(tiny_model_dir, tmp_path, monkeypatch):
    import loop
    import rl
    import train_r3
    from test_errors import train_args
    seen = {}
    monkeypatch.setattr(loop, "train_loop", lambda model, *a, **kw: seen.update(ckpt=model.is_activation_checkpointing))
    config = rl.UpdateConfig
    monkeypatch.setattr(rl, "UpdateConfig", lambda *a, **kw: seen.setdefault("cfg", config(*a, **kw)))
    train_r3.main(train_args(tiny_model_dir, tmp_path / "run", "--grad-checkpointing", "--micro-batch-tokens", "64"))
    assert seen["ckpt"] and seen["cfg"].micro_batch_tokens == 64
    seen.clear()
    train_r3.main(train_args(tiny_model_dir, tmp_path / "run2"))
    assert not seen["ckpt"] and seen["cfg"].micro_batch_tokens == 0


def test_sampling_and_an_update_raise_no_deprecation_warning(tiny_model_dir):
    """What a fresh install runs on every step: no 'X is deprecated' from transformers, peft or torch."""
    import warnings

    import model as model_lib
    import rollout
    m, tok = lora_model(tiny_model_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rollout.sample_turns(m, tok, [[{"role": "user", "content": "hi"}]], rollout.Gen(3, temperature=1.0, seed=0),
                             n=2, keep=True)
        update_grads(m, tok, some_samples())
        model_lib.activation_checkpointing(m)
        update_grads(m, tok, some_samples())
    deprecated = [str(w.message) for w in caught if "deprecat" in str(w.message).lower()]
    assert not deprecated, deprecated
