"""What a new user meets: a quiet start, the --quick preset, a merged model to take elsewhere, and
experiment tracking (wandb offline, TensorBoard) with the metrics of metrics.jsonl."""
import json
import os
import subprocess
import sys

import pytest
import torch

import config
import export
import loop
import model as model_lib
import rl
import tasks
import train_r3
from conftest import ROOT
from sample import generate
from scripted_train import scripted_verify


def test_no_third_party_warning_from_bitsandbytes_cpu_kernels():
    """bitsandbytes warns through this logger on AVX512-BF16 CPUs when the optional `kernels` package is
    missing; every entry point must have silenced it before anything imports bitsandbytes."""
    for entry in ("train_r3", "eval", "sample", "export"):
        code = (f"import {entry}, logging; import peft, bitsandbytes; "
                "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('Failed to load CPU gemm_4bit_forward')")
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "gemm_4bit_forward" not in r.stderr + r.stdout, (entry, r.stderr)


def test_quick_preset_fills_only_what_the_user_left_at_its_default():
    a = train_r3.parse_args(["--quick"])
    assert (a.steps, a.train_size, a.group_size, a.max_new_tokens) == (2, 8, 2, 24)
    b = train_r3.parse_args(["--quick", "--steps", "3", "--group-size", "4"])
    assert (b.steps, b.group_size, b.train_size) == (3, 4, 8)
    assert train_r3.parse_args([]).steps != 2  # off by default


def test_embedded_recipe_sets_the_near_miss_arm_for_r3_only():
    """The main command's R3 step is the arm of 2026-12-07 (docs/self_correction.md); GRPO, a Hub model and
    the paper's flags get none of it, and --quick keeps every failed attempt (8 queries hold no near miss)."""
    arm = {"failure_credit": 0.5, "train_attempts": True, "train_retries": True, "retry_reward": "no-worse",
           "repeat_reward": 0.0, "repeat_advantage": -0.5}
    off = {"failure_credit": 0.0, "train_attempts": False, "train_retries": False, "retry_reward": "verifier",
           "repeat_reward": None, "repeat_advantage": 0.0}
    settings = lambda a: {k: getattr(a, k) for k in arm}  # noqa: E731
    r3 = train_r3.parse_args([])
    assert settings(r3) == arm and r3.micro_batch_tokens == 3072
    assert settings(train_r3.parse_args(config.PAPER_R3_STEP.split())) == off  # the paper's R3 step
    assert settings(train_r3.parse_args(["--method", "grpo"])) == off
    assert settings(train_r3.parse_args(["--model", "Qwen/Qwen2.5-1.5B-Instruct"])) == off  # the paper's
    assert settings(train_r3.parse_args(["--quick"])) == {**arm, "failure_credit": 0.0}
    assert train_r3.parse_args(["--quick", "--failure-credit", "0.25"]).failure_credit == 0.25  # a given flag wins
    line = config.header(r3)
    assert all(f"{k}={v}" in line for k, v in arm.items()), line
    assert config.R3_RECIPE in config.LIMITS.replace("\n", " ")  # --help names it
    assert config.PAPER_R3_STEP in (ROOT / "docs" / "deviations.md").read_text()  # and how to turn it off


def test_progress_bar_counts_every_sampled_token(tiny, capsys, monkeypatch):
    import cli
    import rollout
    monkeypatch.setattr(cli, "on_terminal", lambda: True)  # bars are drawn at a terminal only
    m, tok = tiny
    examples = tasks.load_examples("countdown", "train", n=3, seed=0)
    with rollout.progress("failure set") as bar:
        turns = rollout.attempt(m, tok, "countdown", examples, rollout.Gen(6, 1.0, seed=1), n=2)
        reflections = rollout.sample_turns(m, tok, [t.messages for t in turns[:2]], rollout.Gen(5, 1.0, seed=2))
        counted = bar.n
    assert counted == sum(len(t.ids) for t in turns + reflections) > 0
    err = capsys.readouterr().err
    assert "failure set" in err and "tok/s" in err  # a count and a rate
    assert rollout._bar is None  # closed and gone after the block


def trained_adapter(model_dir, out_dir):
    """An adapter whose LoRA-B is far from zero, saved in standard peft form."""
    torch.manual_seed(0)
    m, tok = model_lib.load_model(str(model_dir), lora_r=4, device="cpu")
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    m.save_pretrained(out_dir)
    return out_dir


def test_export_merges_into_a_plain_transformers_model(tiny_model_dir, tmp_path):
    adapter = trained_adapter(tiny_model_dir, tmp_path / "adapter")
    out = export.export(adapter, tmp_path / "merged", dtype=torch.float32)
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in plain.named_parameters())
    with_adapter, tok = model_lib.load_model(str(tiny_model_dir), adapter=str(adapter), device="cpu")
    with_adapter.eval()
    base, _ = model_lib.load_model(str(tiny_model_dir), device="cpu")
    prompts = [tok("Hello there, how")["input_ids"], tok("The capital of France")["input_ids"]]
    kw = dict(max_new_tokens=12, temperature=0, pad_token_id=tok.pad_token_id)
    merged_out = generate(plain, prompts, **kw)
    assert merged_out == generate(with_adapter, prompts, **kw)
    assert merged_out != generate(base.eval(), prompts, **kw)  # the adapter matters: the test can fail


def test_export_command_refuses_an_existing_out_dir(tiny_model_dir, tmp_path):
    adapter = trained_adapter(tiny_model_dir, tmp_path / "adapter")
    (tmp_path / "taken").mkdir()
    r = subprocess.run([sys.executable, "export.py", str(adapter), "--out", str(tmp_path / "taken")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "already exists" in r.stderr


def small_run(model_dir, out_dir, *extra):
    return ["--model", str(model_dir), "--task", "countdown", "--method", "grpo", "--train-size", "4", "--eval-size", "2",
            "--max-new-tokens", "4", "--reflect-tokens", "4", "--group-size", "2", "--batch-size", "2",
            "--lora-r", "4", "--steps", "2", "--eval-every", "2", "--out-dir", str(out_dir), *extra]


def test_tensorboard_gets_the_metrics_of_metrics_jsonl(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setattr(tasks, "verify", scripted_verify)
    run = tmp_path / "tb"
    train_r3.main(small_run(tiny_model_dir, run, "--tensorboard"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("reward", "loss", "signal_frac", "acc_t1"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [r["step"] for r in lines if key in r]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in lines if key in r], rel=1e-6)


def test_wandb_logs_offline_without_a_network(tiny_model_dir, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setattr(tasks, "verify", scripted_verify)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    logged = []  # what reaches the real (offline) wandb run's log()
    real_init = wandb.init

    def init(**kw):
        run = real_init(**kw)
        real_log = run.log
        run.log = lambda data, step=None: (logged.append((step, dict(data))), real_log(data, step=step))
        return run
    monkeypatch.setattr(wandb, "init", init)
    run = tmp_path / "wb"
    train_r3.main(small_run(tiny_model_dir, run, "--wandb", "r3-test"))
    assert os.environ.get("WANDB_MODE") == "offline"
    monkeypatch.delenv("WANDB_MODE")
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("*.wandb")), "no offline run written"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in logged] == [r["step"] for r in lines]
    for (_, data), line in zip(logged, lines):
        assert data == {k: v for k, v in line.items() if k not in ("step", "kind")}


@pytest.mark.parametrize("flag, package", [("--wandb", "wandb"), ("--tensorboard", "torch.utils.tensorboard")])
def test_missing_tracking_package_is_one_line(tiny_model_dir, tmp_path, flag, package):
    code = (f"import sys; sys.modules[{package!r}] = None; sys.argv = ['train_r3.py'] + {small_run(tiny_model_dir, tmp_path / 'x', flag)!r}; "
            "import cli, train_r3; cli.run(train_r3.main)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error:"), r.stderr[-2000:]
    assert f"pip install {package.split('.')[-1]}" in r.stderr and "Traceback" not in r.stderr


def test_repeat_reward_takes_a_number_or_none():
    assert config.optional_float("none") is None and config.optional_float(" None ") is None
    assert config.optional_float("-0.5") == -0.5
    import argparse
    import pytest
    with pytest.raises(argparse.ArgumentTypeError, match="a number or 'none'"):
        config.optional_float("abc")
