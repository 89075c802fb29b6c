"""SCoRe (score.py) and Re-ReST (rerest.py): the shaped rewards, the stage schedule and Re-ReST's data by
hand, then each method end to end on the tiny model, with the real verifier (a random model never passes,
so nothing is learned) and with scripted verdicts (some attempts pass, so the updates really run)."""
import itertools
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import model as model_lib
import rerest
import rl
import rundir
import score
import tasks
import train_r3
from rollout import Turn
from verifiers import Verdict


# ---------------------------------------------------------------------------------------------- SCoRe, by hand

@pytest.mark.parametrize("r1, r2, stage_1, stage_2", [
    # (r1, r2) -> stage I: (attempt-1 reward, attempt-2 reward); stage II with alpha 10: r2 + 10 (r2 - r1)
    (0.0, 0.0, (0.0, 0.0), (0.0, 0.0)),
    (0.0, 1.0, (0.0, 1.0), (0.0, 11.0)),    # wrong -> right: the bonus pays
    (1.0, 0.0, (0.0, 0.0), (1.0, -10.0)),   # right -> wrong: the bonus costs
    (1.0, 1.0, (0.0, 1.0), (1.0, 1.0)),
])
def test_shaped_rewards_by_hand(r1, r2, stage_1, stage_2):
    assert score.shaped_rewards(r1, r2, 10.0, 1) == stage_1
    assert score.shaped_rewards(r1, r2, 10.0, 2) == stage_2


def test_shaped_rewards_on_tensors_and_other_alpha():
    r1, r2 = torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 0.0, 1.0])
    first, second = score.shaped_rewards(r1, r2, 10.0, 1)
    assert first.tolist() == [0, 0, 0, 0] and second.tolist() == [0, 1, 0, 1]
    first, second = score.shaped_rewards(r1, r2, 2.0, 2)
    assert first.tolist() == [0, 0, 1, 1] and second.tolist() == [0, 3, -2, 1]


def test_stage_schedule_boundaries():
    args = SimpleNamespace(stage1_steps=3)
    assert [score.stage(s, args) for s in range(6)] == [1, 1, 1, 2, 2, 2]  # 0-based steps; logged as 1..6
    assert [score.stage(s, SimpleNamespace(stage1_steps=0)) for s in range(3)] == [2, 2, 2]
    assert train_r3.parse_args(["--steps", "20"]).stage1_steps == 10  # default: half the steps
    assert train_r3.parse_args(["--steps", "5", "--stage1-steps", "0"]).stage1_steps == 0


def test_stage_after_resume_inside_stage_two():
    args = train_r3.parse_args(["--method", "score", "--steps", "10", "--stage1-steps", "4"])
    state = {"step": 6}  # what rundir.load_checkpoint returns for a run killed after step 6
    assert [score.stage(s, args) for s in range(state["step"], args.steps)] == [2, 2, 2, 2]
    assert score.stage(3, args) == 1 and score.stage(4, args) == 2
    assert score.kl_betas(args, 1) == (args.beta2, 0.0) and score.kl_betas(args, 2) == (args.beta1, args.beta1)


def test_baseline_is_the_group_mean_or_the_batch_mean():
    rewards = torch.tensor([1.0, 0.0, 11.0, 0.0])
    assert score.baseline_advantages(rewards, 2).tolist() == [0.5, -0.5, 5.5, -5.5]
    assert score.baseline_advantages(rewards, 1).tolist() == [-2.0, -3.0, 8.0, -3.0]  # batch mean 3


def test_nll_loss_is_the_token_mean_over_completions():
    logp = torch.log(torch.tensor([[0.5, 0.25], [1.0, 0.1]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    expected = -(torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.25))) / 3
    assert torch.allclose(rl.nll_loss(logp, mask), expected)
    assert torch.allclose(rl.nll_loss(logp, mask, normalizer=6), expected / 2)


# ---------------------------------------------------------------------------------------------- Re-ReST, by hand

def turn(prompt: str, text: str, ok: bool) -> Turn:
    verdict = Verdict(True) if ok else Verdict(False, "missed_target", "expression equals 5, target is 7")
    return Turn([{"role": "user", "content": prompt}], [len(prompt)], [ord(c) for c in text], text, verdict)


def test_assemble_by_hand():
    examples = [{"id": "a"}, {"id": "b"}]
    agent = [turn("qa", "A", True), turn("qa", " A ", True), turn("qa", "x", False),  # k = 3, prompt-major
             turn("qb", "y", False), turn("qb", "z", False), turn("qb", "B", True)]
    corrections = [(0, turn("fix a", "C", True)),   # passes: D_R, on example a's agent prompt
                   (0, turn("fix a", "D", False)),  # fails: dropped
                   (1, turn("fix b", "B", True)),   # already in D_M for b: dropped
                   (1, turn("fix b", "E", True)),
                   (1, turn("fix b", "E ", True)),  # the same output again for b: dropped
                   (0, turn("fix a", "E", True))]   # the same text for another input: kept
    d_m, d_r = rerest.assemble(examples, agent, corrections)
    assert [t.text for t in d_m] == ["A", "B"]
    assert [(t.prompt_ids, t.text) for t in d_r] == [([2], "C"), ([2], "E"), ([2], "E")]
    assert [t.messages[0]["content"] for t in d_r] == ["qa", "qb", "qa"]  # the agent's prompt, not the reflector's
    assert [t.ids for t in d_r] == [[ord("C")], [ord("E")], [ord("E")]]  # the correction's tokens
    assert all(t.verdict.correct for t in d_m + d_r)
    # the reflector trains on its own passing corrections, with its own prompt, once each
    assert [(t.messages[0]["content"], t.text) for t in rerest.reflector_data(corrections)] == \
        [("fix a", "C"), ("fix b", "B"), ("fix b", "E"), ("fix a", "E")]
    assert rerest.assemble([], [], []) == ([], [])


def test_reflector_prompt_carries_input_failed_output_and_feedback():
    example = {"id": "3,4:7", "nums": [3, 4], "target": 7}
    verdict = tasks.verify("countdown", "<answer> 3 * 4 </answer>", example)
    messages = rerest.reflector_messages("countdown", example, "<answer> 3 * 4 </answer>", verdict)
    text = messages[-1]["content"]
    assert "[3, 4]" in text and "<answer> 3 * 4 </answer>" in text
    assert "missed target" in text and verdict.message in text and tasks.FORMAT["countdown"] in text


# ---------------------------------------------------------------------------------------------- end to end

def run_args(model_dir, out_dir, method, *extra):
    return ["--model", str(model_dir), "--task", "countdown", "--method", method, "--steps", "2", "--train-size", "4",
            "--eval-size", "2", "--max-new-tokens", "8", "--reflect-tokens", "8", "--group-size", "2",
            "--batch-size", "2", "--out-dir", str(out_dir), *extra]


def read_metrics(run_dir):
    """The training lines (not the held-out eval before the first step, "kind": "eval")."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r.get("kind") != "eval"]


def adapter_weights(run_dir):
    return load_file(rundir.latest_checkpoint(run_dir) / "adapter" / "adapter_model.safetensors")


def lora_b_moved(run_dir) -> bool:
    """LoRA-B starts at zero: any nonzero LoRA-B weight means training changed the adapter."""
    return any(v.abs().sum() > 0 for k, v in adapter_weights(run_dir).items() if "lora_B" in k)


def script_verdicts(monkeypatch):
    """Every third verdict passes, whatever the text: attempts, corrections and evals alike. SCoRe's first
    step then sees r1 = [1, 0, 0, 1] and r2 = [0, 0, 1, 0]: a flip each way and groups with signal."""
    calls = itertools.count()
    monkeypatch.setattr(tasks, "verify", lambda task, text, example: Verdict(True) if next(calls) % 3 == 0
                        else Verdict(False, "scripted", "scripted feedback"))


def test_score_smoke_then_resume_in_stage_two(tiny_model_dir, tmp_path):
    run = tmp_path / "score"
    train_r3.main(run_args(tiny_model_dir, run, "score", "--stage1-steps", "1"))
    start = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert start["step"] == 0 and start["kind"] == "eval" and {"acc_t1", "acc_t2"} <= start.keys()
    lines = read_metrics(run)
    assert [(r["step"], r["kind"], r["stage"]) for r in lines] == [(1, "train", 1), (2, "train", 2)]
    for key in ("reward", "train_acc_t1", "train_acc_t2", "train_i2c", "train_c2i", "kl", "loss", "signal_frac"):
        assert key in lines[0], key
    assert "acc_t1" in lines[-1] and "acc_t2" in lines[-1]  # the held-out eval (score mode) at the last step
    assert all(r["signal_frac"] == 0 for r in lines)  # nothing passes: no advantage, the KL alone is 0 too
    assert not lora_b_moved(run)
    model_lib.load_model(str(tiny_model_dir), adapter=str(rundir.latest_checkpoint(run) / "adapter"), device="cpu")

    # resumed with more --steps and no --stage1-steps (its default, half of 5, would put step 3 in stage I):
    # the checkpoint's boundary holds
    train_r3.main(run_args(tiny_model_dir, run, "score", "--steps", "5", "--resume"))
    lines = read_metrics(run)
    assert [(r["step"], r["stage"]) for r in lines] == [(1, 1), (2, 2), (3, 2), (4, 2), (5, 2)]
    assert rundir.latest_checkpoint(run).name == "ckpt-000005"
    assert json.loads((rundir.latest_checkpoint(run) / "state.json").read_text())["stage1_steps"] == 1


def test_score_scripted_verdicts_update_the_adapter(tiny_model_dir, tmp_path, monkeypatch):
    script_verdicts(monkeypatch)
    run = tmp_path / "score-scripted"
    # no evals: they would take verdicts from the script before the first step
    train_r3.main(run_args(tiny_model_dir, run, "score", "--stage1-steps", "1", "--lr", "1e-2", "--eval-every", "0"))
    lines = read_metrics(run)
    assert [r["stage"] for r in lines] == [1, 2]
    assert all(r["signal_frac"] > 0 and r["grad_norm"] > 0 for r in lines)
    assert (lines[0]["train_acc_t1"], lines[0]["train_acc_t2"]) == (0.5, 0.25)
    assert (lines[0]["train_i2c"], lines[0]["train_c2i"]) == (0.25, 0.5)
    assert lines[0]["shaped_reward"] == lines[0]["reward"]  # stage I: attempt 2's reward unshaped
    assert lines[1]["kl"] > 0 and lines[1]["loss"] != 0  # the first update moved the policy off the base
    assert lora_b_moved(run)


@pytest.mark.parametrize("n_items, batch_size, size", [(8, 4, 2), (8, 3, 2), (7, 4, 3), (5, 2, 1), (3, 4, 4)])
def test_rerest_epoch_covers_every_item_once_across_ranks(n_items, batch_size, size):
    for epoch_seed in (0, 1, 2):
        batches = [rerest.epoch_batches(n_items, batch_size, epoch_seed, rank, size) for rank in range(size)]
        seen = [i for rank_batches in batches for batch in rank_batches for i in batch]
        assert sorted(seen) == list(range(n_items))
        assert len({len(b) for b in batches}) == 1  # every rank takes part in every optimizer step


def test_rerest_defaults_are_the_official_ones_and_others_keep_theirs():
    a = train_r3.parse_args(["--method", "rerest"])
    assert (a.lora_r, a.lora_alpha, a.lora_targets, a.lr) == (8, 16, "qv", 3e-4)
    b = train_r3.parse_args(["--method", "r3", "--task", "math"])
    assert (b.lora_r, b.lora_alpha, b.lora_targets, b.lr, b.kl_beta) == (16, None, "all", 1e-4, 0.001)
    assert train_r3.parse_args(["--method", "r3"]).lr == 2e-4  # the embedded model's countdown recipe
    c = train_r3.parse_args(["--method", "rerest", "--lora-r", "4", "--lr", "1e-3"])
    assert (c.lora_r, c.lr) == (4, 1e-3)


def test_rerest_feedback_never_holds_the_gold_answer():
    """The reflector reads the verifier's feedback: on every BFCL row, a call with the right tool and a
    wrong value for each gold argument must not be told the accepted values."""
    rows = tasks.load_examples("function_calling", "train", n=200, seed=0)
    checked = 0
    for ex in rows:
        for entry in ex["ground_truth"]:
            for name, gold_args in entry.items():
                for arg, allowed in gold_args.items():
                    values = [v for v in allowed if v not in ("", None) and len(str(v)) > 3]
                    if not values:
                        continue
                    call = json.dumps([{"name": n, "arguments": {**{a: "zzz-wrong" for a in ga}}}
                                       for e in ex["ground_truth"] for n, ga in e.items()])
                    verdict = tasks.verify("function_calling", call, ex)
                    prompt = rerest.reflector_messages("function_calling", ex, call, verdict)[-1]["content"]
                    feedback = prompt[prompt.index("The checker's feedback"):prompt.index("Write a corrected")]
                    assert not verdict.correct and not any(str(v) in feedback for v in values), feedback
                    checked += 1
    assert checked > 50


def test_rerest_smoke(tiny_model_dir, tmp_path):
    run = tmp_path / "rerest"
    train_r3.main(run_args(tiny_model_dir, run, "rerest", "--k", "2"))
    phases = {r["phase"]: r for r in read_metrics(run)}
    assert phases["sample"]["outputs"] == 8 and phases["sample"]["agent_pass"] == 0
    assert (phases["data"]["d_m"], phases["data"]["d_r"]) == (0, 0)  # nothing passes: nothing to learn
    assert "acc_t1" in phases["eval"]
    assert not lora_b_moved(run)


def test_rerest_scripted_verdicts_fill_d_m_and_d_r_and_train(tiny_model_dir, tmp_path, monkeypatch):
    script_verdicts(monkeypatch)
    run = tmp_path / "rerest-scripted"
    train_r3.main(run_args(tiny_model_dir, run, "rerest", "--k", "2", "--sft-epochs", "2", "--lr", "1e-2"))
    lines = read_metrics(run)
    data = next(r for r in lines if r["phase"] == "data")
    assert data["d_m"] > 0 and data["d_r"] > 0
    reflects = [r for r in lines if r["phase"] == "reflect"]
    assert [r["reflector"] for r in reflects] == ["base", "trained"] and reflects[0]["corrected"] > 0
    for phase in ("reflector_sft", "agent_sft"):  # one line per epoch, with the epoch's mean loss
        epochs = [r for r in lines if r["phase"] == phase]
        assert [r["epoch"] for r in epochs] == [1, 2] and all(r["loss"] > 0 for r in epochs)
    agent = [r for r in lines if r["phase"] == "agent_sft"]
    assert agent[0]["items"] == data["d_m"] + data["d_r"]
    # the checkpoint holds the agent alone, in standard peft form; the reflector is saved beside it
    weights = adapter_weights(run)
    assert not any(rerest.REFLECTOR in k for k in weights) and lora_b_moved(run)
    assert (run / "reflector" / "adapter_config.json").exists() and not (run / "README.md").exists()
    reflector = [r for r in lines if r["phase"] == "reflector_sft"]
    assert [r["reflector_step"] for r in reflector] == [1, 2] and all(r["step"] == 0 for r in reflector)
    state = json.loads((rundir.latest_checkpoint(run) / "state.json").read_text())
    assert state["step"] == agent[-1]["step"] > 0 and state["round"] == 1
    model_lib.load_model(str(tiny_model_dir), adapter=str(rundir.latest_checkpoint(run) / "adapter"), device="cpu")
    reflector_weights = load_file(run / "reflector" / "adapter_model.safetensors")
    assert reflector_weights.keys() == weights.keys()  # the same standard form, and it was trained
    assert any(v.abs().sum() > 0 for k, v in reflector_weights.items() if "lora_B" in k)
    model_lib.load_model(str(tiny_model_dir), adapter=str(run / "reflector"), device="cpu")
