"""`train rm`, `train dpo` (every loss, DPO-ftx, KTO) and `train ppo` on stories260K (CPU)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from conftest import bad, ok, read_meta, shared_path, write_jsonl

STORIES = "models/stories260K"
LF = "data/llamafactory"


def _log(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "trainer_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    """A learnable preference: the chosen story says the animal was happy, the rejected one sad."""
    base = shared_path(STORIES)
    work = tmp_path_factory.mktemp("prefs")
    rng = random.Random(0)
    animals = "cat dog bird fish frog bear duck lion mouse rabbit".split()
    names = "Lily Tom Sue Ben Max Anna Tim Mia".split()
    pairs, prompts = [], []
    for _ in range(300):
        a, n = rng.choice(animals), rng.choice(names)
        tail = rng.choice(["They played all day.", "They went to the park.", "It was a sunny day."])
        pairs.append({"instruction": f"Tell me about {n} and the {a}.",
                      "chosen": f"{n} had a {a}. The {a} was {rng.choice(['happy', 'glad'])}. {tail}",
                      "rejected": f"{n} had a {a}. The {a} was {rng.choice(['sad', 'angry'])}. {tail}"})
    for _ in range(48):
        a, n = rng.choice(animals), rng.choice(names)
        prompts.append({"instruction": f"Tell me about {n} and the {a}.", "output": f"{n} had a {a}."})
    write_jsonl(work / "pairs.jsonl", pairs)
    write_jsonl(work / "prompts.jsonl", prompts)
    ok(["data", "align", work / "pairs.jsonl", "-o", work / "pairs.arrow"])
    ok(["data", "split", work / "pairs.arrow", "--val-size", "48", "-o", work / "split"])
    paths = {"base": base, "dir": work}
    for part in ("train", "val"):
        for stage in ("rm", "dpo"):
            paths[f"{stage}_{part}"] = work / f"{stage}_{part}.arrow"
            ok(["data", "pack", work / "split" / f"{part}.arrow", "-m", base, "-t", "default", "-s", stage,
                "--cutoff", "128", "-o", paths[f"{stage}_{part}"]])
    ok(["data", "align", work / "prompts.jsonl", "-o", work / "prompts.arrow"])
    paths["ppo"] = work / "ppo.arrow"
    ok(["data", "pack", work / "prompts.arrow", "-m", base, "-t", "default", "-s", "ppo", "--cutoff", "64",
        "-o", paths["ppo"]])
    rm = work / "rm"
    # (with selective checkpointing of every second layer: the value-head model takes it too)
    ok(["train", "rm", "-m", base, "-d", paths["rm_train"], "--eval-data", paths["rm_val"], "-o", rm,
        "--max-steps", "40", "--lr", "3e-3", "--batch-size", "8", "--grad-accum", "1", "--logging-steps", "10",
        "--eval-steps", "40", "--checkpointing", "selective", "--checkpoint-every", "2"])
    paths["rm"] = rm
    return paths


def test_reward_model_learns_the_preference(prefs):
    rm = prefs["rm"]
    record = json.loads((rm / "lmforge.json").read_text())
    assert record["kind"] == "reward" and record["stage"] == "rm"
    assert {"adapter_model.safetensors", "value_head.safetensors", "lmforge.json"} <= {p.name for p in rm.iterdir()}
    assert record["metrics"]["eval_accuracy"] >= 0.9  # chance is 0.5
    assert record["metrics"]["eval_margin"] > 1.0


def test_reward_model_scores_in_process(prefs):
    """The saved adapter + value head load back and rank a chosen answer above a rejected one."""
    import torch
    from lmforge.shared.model.value import ValueModel
    from lmforge.shared.modeldir.weights import load_value_head
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    causal = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(prefs["base"]), str(prefs["rm"]))
    model = ValueModel(causal, load_value_head(prefs["rm"], causal.config.hidden_size)).eval()
    tok = AutoTokenizer.from_pretrained(str(prefs["base"]))
    texts = ["Human: Tell me about Tom and the dog.\nAssistant: Tom had a dog. The dog was happy. They played all day.</s>",
             "Human: Tell me about Tom and the dog.\nAssistant: Tom had a dog. The dog was sad. They played all day.</s>"]
    scores = []
    for text in texts:
        ids = torch.tensor([tok(text).input_ids])
        with torch.no_grad():
            scores.append(float(model(input_ids=ids, last_index=torch.tensor([ids.shape[1] - 1]))))
    assert scores[0] > scores[1]


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "orpo", "simpo"])
def test_every_dpo_loss_runs_and_the_margin_grows(prefs, tmp_path, loss):
    out = tmp_path / loss
    args = ["train", "dpo", "-m", prefs["base"], "-d", prefs["dpo_train"], "-o", out, "--loss", loss,
            "--max-steps", "12", "--lr", "2e-3", "--batch-size", "4", "--grad-accum", "1", "--logging-steps", "4"]
    if loss == "sigmoid":
        args += ["--ftx", "0.5"]
    if loss == "orpo":
        args += ["--beta", "1.0"]  # the paper's lambda 0.1 moves the margin too slowly for 12 steps
    ok(args)
    log = [e for e in _log(out) if "rewards/margins" in e]
    assert log[-1]["rewards/margins"] > log[0]["rewards/margins"] + 0.2, log
    assert log[-1]["rewards/accuracies"] >= 0.75
    record = json.loads((out / "lmforge.json").read_text())
    assert record["stage"] == "dpo" and record["hyperparameters"]["loss"] == loss
    if loss == "sigmoid":  # DPO-ftx: the SFT term is there and nonzero
        assert all(e.get("sft_loss", 0) > 0 for e in log)
        assert record["hyperparameters"]["ftx"] == 0.5


def test_dpo_with_selective_checkpointing_in_bf16(prefs, tmp_path):
    """`train dpo --precision bf16 --checkpointing selective`: the policy's fused LoRA layers under
    selective checkpointing, the reference pass (adapters off, no gradients) beside it; the margin grows."""
    out = tmp_path / "selective"
    ok(["train", "dpo", "-m", prefs["base"], "-d", prefs["dpo_train"], "-o", out, "--precision", "bf16",
        "--checkpointing", "selective", "--max-steps", "12", "--lr", "2e-3", "--batch-size", "4", "--grad-accum", "1",
        "--logging-steps", "4"])
    log = [e for e in _log(out) if "rewards/margins" in e]
    assert log[-1]["rewards/margins"] > log[0]["rewards/margins"] + 0.2, log
    hyper = json.loads((out / "lmforge.json").read_text())["hyperparameters"]
    assert hyper["checkpointing"] == "selective" and hyper["precision"] == "bf16"


def _exact_dpo(model, ref, batch, loss: str, beta: float, ftx: float):
    """DPO written out on full logits: log_softmax over the vocabulary at every position."""
    import torch
    import torch.nn.functional as F

    def logps(net):
        logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        token = torch.log_softmax(logits, -1).gather(2, batch["input_ids"][:, 1:, None]).squeeze(-1)
        keep = batch["completion_mask"][:, 1:].float()
        return (token * keep).sum(1), keep.sum(1)

    (c, r), (nc, nr) = (x.chunk(2) for x in logps(model))
    with torch.no_grad():
        rc, rr = logps(ref)[0].chunk(2)
    delta = (c - rc) - (r - rr)
    per = {"sigmoid": lambda: -F.logsigmoid(beta * delta), "hinge": lambda: torch.relu(1 - beta * delta),
           "ipo": lambda: ((c - rc) / nc - (r - rr) / nr - 1 / (2 * beta)) ** 2}[loss]()
    return per.mean() + ftx * -c.sum() / nc.sum()


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge"])
def test_lean_dpo_equals_the_definition_and_trls_forward(prefs, tmp_path, loss):
    """lmforge's DPO forward (the output layer only at completion positions, in chunks) gives, on one
    batch with the SFT term of --ftx: with LoRA (the adapter moved away from TRL's reference copy of
    it), TRL's own loss, gradients and metrics; with full tuning (the output layer trains: its
    gradient is recomputed in backward), the loss and gradients of DPO written out on full logits."""
    import torch
    from lmforge.shared.data.packed import open_packed
    from lmforge.shared.train.patches.preference import dpo_trainer_class
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    tokenizer = AutoTokenizer.from_pretrained(str(prefs["base"]))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    data = open_packed(prefs["dpo_train"], ("dpo",))
    for full in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(str(prefs["base"]))
        if not full:
            model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
        config = DPOConfig(output_dir=str(tmp_path / "out"), loss_type=[loss, "sft"], loss_weights=[1.0, 0.5],
                           beta=0.1, max_length=None, per_device_train_batch_size=3, report_to=[], use_cpu=True,
                           bf16=False)   # (TRL would wrap its reference copy in bf16 autocast on this CPU)
        trainer = dpo_trainer_class()(model=model, args=config, train_dataset=data.dataset,
                                       processing_class=tokenizer, ftx=0.5)
        assert trainer._lean
        batch = trainer.data_collator([data.dataset[i] for i in range(3)])
        with torch.no_grad():   # the policy moves away from the reference (TRL's copy of the adapter / model)
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.02)
        trainer.model.train()
        results = []
        for way in ("lean", "other"):
            trainer._lean = way == "lean"
            trainer._metrics["train"].clear()
            trainer.model.zero_grad()
            if way == "other" and full:
                value = _exact_dpo(trainer.model, trainer.ref_model, batch, loss, 0.1, 0.5)
            else:
                value = trainer._compute_loss(trainer.model, batch, False)
            value.backward()
            grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
            metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()
                       if k.startswith(("rewards/", "logps/", "sft_loss"))}
            results.append((float(value.detach()), grads, metrics))
        (lean_loss, lean_grads, lean_metrics), (other_loss, other_grads, other_metrics) = results
        assert lean_loss == pytest.approx(other_loss, rel=1e-4, abs=1e-5)
        assert lean_grads.keys() == other_grads.keys() and lean_grads
        if full:
            assert any("embed" in n or "lm_head" in n for n in lean_grads)   # the (tied) output layer trains
        for name, grad in lean_grads.items():
            assert torch.allclose(grad, other_grads[name], rtol=1e-3, atol=1e-6), name
        if not full:
            assert lean_metrics.keys() == other_metrics.keys() and "sft_loss" in lean_metrics
            assert lean_metrics["rewards/margins"] != 0
            for key, value in lean_metrics.items():
                assert value == pytest.approx(other_metrics[key], rel=1e-4, abs=1e-5), key


def test_lean_kto_equals_trls_forward(prefs, tmp_path):
    """lmforge's KTO forward (completion_logps for the answer rows and the KL rows, policy and
    reference) gives TRL's loss, gradients and metrics on one batch holding desirable and
    undesirable answers, with the adapter moved away from TRL's reference copy of it."""
    import torch
    from lmforge.shared.data.packed import open_packed
    from lmforge.shared.train.patches.preference import kto_trainer_class
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig

    kto = tmp_path / "kto.arrow"
    ok(["data", "align", shared_path(f"{LF}/kto_en_demo.json"), "--max-samples", "24", "-o", tmp_path / "k.arrow"])
    ok(["data", "pack", tmp_path / "k.arrow", "-m", prefs["base"], "-t", "default", "-s", "kto", "--cutoff", "128",
        "-o", kto])
    tokenizer = AutoTokenizer.from_pretrained(str(prefs["base"]))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(prefs["base"])),
                           LoraConfig(r=4, target_modules="all-linear"))
    config = KTOConfig(output_dir=str(tmp_path / "out"), beta=0.1, max_length=None, per_device_train_batch_size=4,
                       report_to=[], use_cpu=True, bf16=False, train_sampling_strategy="sequential",
                       desirable_weight=1.0, undesirable_weight=1.5)
    trainer = kto_trainer_class()(model=model, args=config, train_dataset=open_packed(kto, ("kto",)).dataset,
                                   processing_class=tokenizer)
    assert trainer._lean and trainer.calculate_KL
    rows = [trainer.train_dataset[i] for i in range(4)]
    assert {r["label"] for r in rows} == {True, False}
    batch = trainer.data_collator(rows)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    trainer.model.train()
    results = []
    for lean in (True, False):
        trainer._lean = lean
        trainer._metrics["train"].clear()
        trainer.model.zero_grad()
        value = trainer._compute_loss(trainer.model, batch, False)
        value.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith(("rewards/", "logps/", "kl"))}
        results.append((float(value.detach()), grads, metrics))
    (lean_loss, lean_grads, lean_metrics), (trl_loss, trl_grads, trl_metrics) = results
    assert lean_loss == pytest.approx(trl_loss, rel=1e-4, abs=1e-6)
    assert lean_grads.keys() == trl_grads.keys() and lean_grads
    for name, grad in lean_grads.items():
        assert torch.allclose(grad, trl_grads[name], rtol=1e-3, atol=1e-6), name
    assert lean_metrics["kl"] > 0   # the KL rows count (not clamped away)
    assert lean_metrics.keys() == trl_metrics.keys() and "rewards/margins" in lean_metrics
    for key, value in lean_metrics.items():
        assert value == pytest.approx(trl_metrics[key], rel=1e-4, abs=1e-6), key


def test_kto_on_kto_en_demo(prefs, tmp_path):
    kto = tmp_path / "kto.arrow"
    ok(["data", "align", shared_path(f"{LF}/kto_en_demo.json"), "--max-samples", "48", "-o", tmp_path / "k.arrow"])
    ok(["data", "pack", tmp_path / "k.arrow", "-m", prefs["base"], "-t", "default", "-s", "kto", "--cutoff", "128",
        "-o", kto])
    out = tmp_path / "kto"
    ok(["train", "dpo", "--loss", "kto", "-m", prefs["base"], "-d", kto, "-o", out, "--max-steps", "6",
        "--batch-size", "4", "--grad-accum", "1", "--logging-steps", "2"])
    log = _log(out)
    assert any("rewards/chosen" in e for e in log) and any("kl" in e for e in log)
    assert "stage 'kto'" in bad(["train", "dpo", "--loss", "kto", "-m", prefs["base"], "-d", prefs["dpo_train"],
                                 "-o", tmp_path / "x"])


def test_ppo_raises_the_reward(prefs, tmp_path):
    out = tmp_path / "ppo"
    result = ok(["train", "ppo", "-m", prefs["base"], "--reward", prefs["rm"], "-d", prefs["ppo"], "-o", out,
                 "--max-steps", "20", "--batch-size", "8", "--mini-batch-size", "4", "--max-new-tokens", "16",
                 "--lr", "5e-3", "--kl-coef", "0.05", "--seed", "1"])
    assert result.stdout.decode() == f"{out}\n"
    log = _log(out)
    rewards = [e["reward"] for e in log]
    assert len(rewards) == 20
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 1.0, rewards
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    for key in ("kl", "entropy", "value_loss", "policy_loss", "response_length", "kl_coef"):
        assert key in log[-1]
    record = json.loads((out / "lmforge.json").read_text())
    assert record["stage"] == "ppo" and record["layout"] == "shared"
    assert {"adapter_model.safetensors", "value_head.safetensors"} <= {p.name for p in out.iterdir()}


def test_ppo_reference_is_the_adapter_disabled_base(prefs):
    """With model sharing, the reference's log-probs are the base model's, before and after the
    policy adapter has been trained."""
    import torch
    from lmforge.shared.model.models import choose_device
    from lmforge.shared.train import ppo
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(prefs["base"]))
    tokenizer.pad_token = tokenizer.eos_token
    from lmforge.shared.core.commands.train import TrainPPO

    options = TrainPPO(model=str(prefs["base"]), reward=str(prefs["rm"]), data=str(prefs["ppo"]),
                       output=Path("unused"))
    roles = ppo.build(options, tokenizer, choose_device())
    base = AutoModelForCausalLM.from_pretrained(str(prefs["base"])).eval()
    ids = torch.tensor([[1, 80, 90, 100, 200, 300, 400]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    assert (roles.reference_logits(ids, mask) - expected).abs().max() < 1e-5
    for p in roles.trainable():  # move the policy away from the base
        p.data.add_(0.05 * torch.randn_like(p))
    with torch.no_grad():
        policy_logits, _ = roles.policy(ids, mask)
    assert (policy_logits - expected).abs().max() > 1e-3
    assert (roles.reference_logits(ids, mask) - expected).abs().max() < 1e-5
    # scoring switches to the reward adapter and back without making it trainable
    roles.score(ids, mask, torch.tensor([ids.shape[1] - 1]))
    assert not any(p.requires_grad for n, p in roles.model.named_parameters() if ".reward." in n)
    assert any(p.requires_grad for n, p in roles.model.named_parameters() if ".default." in n)


def test_ppo_resume_matches_an_uninterrupted_run(prefs, tmp_path):
    args = ["train", "ppo", "-m", prefs["base"], "--reward", prefs["rm"], "-d", prefs["ppo"], "--max-steps", "6",
            "--save-steps", "2", "--batch-size", "4", "--mini-batch-size", "2", "--max-new-tokens", "8", "--lr", "1e-3"]
    whole = tmp_path / "whole"
    ok([*args, "-o", whole, "--keep-checkpoints"])
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "checkpoint-4", cut / "checkpoints" / "checkpoint-4")
    lines = (whole / "trainer_log.jsonl").read_text().splitlines()
    (cut / "trainer_log.jsonl").write_text("\n".join(lines[:5]) + "\n")  # what a run killed at step 5 leaves
    ok([*args, "-o", cut, "--resume"])
    from safetensors.torch import load_file

    a, b = load_file(str(whole / "adapter_model.safetensors")), load_file(str(cut / "adapter_model.safetensors"))
    assert all((a[k] - b[k]).abs().max() < 1e-6 for k in a)
    assert [json.loads(x)["step"] for x in (cut / "trainer_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_ppo_separate_layout_and_sft_adapter(prefs, tmp_path):
    sft = tmp_path / "sft"
    ok(["data", "align", prefs["dir"] / "prompts.jsonl", "-o", tmp_path / "p.arrow"])
    ok(["data", "pack", tmp_path / "p.arrow", "-m", prefs["base"], "-t", "default", "--cutoff", "64", "-o", tmp_path / "s.arrow"])
    ok(["train", "sft", "-m", prefs["base"], "-d", tmp_path / "s.arrow", "-o", sft, "--max-steps", "2"])
    out = tmp_path / "sep"
    ok(["train", "ppo", "-m", prefs["base"], "--sft", sft, "--reward", prefs["rm"], "-d", prefs["ppo"], "-o", out,
        "--layout", "separate", "--max-steps", "2", "--batch-size", "4", "--max-new-tokens", "8"])
    record = json.loads((out / "lmforge.json").read_text())
    assert record["layout"] == "separate" and record["stacked_on"] == [str(sft.resolve())]
    assert (out / "critic" / "adapter_model.safetensors").exists()


def test_preference_refusals(prefs, tmp_path):
    base = prefs["base"]
    assert "stage 'rm'" in bad(["train", "sft", "-m", base, "-d", prefs["rm_train"], "-o", tmp_path / "a"])
    assert "not a directory" in bad(["train", "ppo", "-m", base, "--reward", tmp_path / "nope", "-d", prefs["ppo"],
                                     "-o", tmp_path / "b"])
    assert "--mini-batch-size" in bad(["train", "ppo", "-m", base, "--reward", prefs["rm"], "-d", prefs["ppo"],
                                       "-o", tmp_path / "c", "--batch-size", "2", "--mini-batch-size", "4"])
    assert "not a reward model" in bad(["train", "ppo", "-m", base, "--reward", prefs["dir"], "-d", prefs["ppo"],
                                        "-o", tmp_path / "d"])
    # LoRA+ and BAdam are pt/sft's: train dpo does not offer them
    assert "No such option: --loraplus-ratio" in bad(["train", "dpo", "-m", base, "-d", prefs["dpo_train"], "-o",
                                                      tmp_path / "e", "--loraplus-ratio", "4"])
    assert "'badam' is not one of" in bad(["train", "dpo", "-m", base, "-d", prefs["dpo_train"], "-o",
                                           tmp_path / "e", "--method", "badam"])
    meta = read_meta(prefs["ppo"])
    assert meta["stage"] == "ppo"


def test_eval_rm_reports_accuracy_and_margin(prefs):
    report = json.loads(ok(["eval", "rm", "-m", prefs["base"], "--reward", prefs["rm"], "-d", prefs["rm_val"],
                            "--json"]).stdout)
    assert report["pairs"] == 48 and report["accuracy"] >= 90 and report["mean_margin"] > 1.0
    assert "not a reward model" in bad(["eval", "rm", "-m", prefs["base"], "--reward", prefs["dir"],
                                        "-d", prefs["rm_val"]])
