"""`train pt | sft | rm | dpo | ppo | grpo`: each stage's options, composed from the parts in
training.py plus the stage's own. A stage lists exactly the options it takes."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from lmforge.shared.core.commands.common import BATCH_SIZE, MAX_NEW_TOKENS, PRECISION, REWARD, SEED, TEMPERATURE, TOP_P
from lmforge.shared.core.commands.training import (EPOCHS, GRAD_ACCUM, KEEP_CHECKPOINTS, LEARNING_RATE, LOGGING_STEPS,
                                                    LORA_ALPHA, LORA_RANK, LORA_TARGET, MAX_GRAD_NORM, MAX_STEPS,
                                                    METHODS, P, R, REPORT, RESUME, SAVE_STEPS, TRAIN_MODEL,
                                                    TRAIN_OUTPUT, TRAIN_OVERWRITE, Base, ContextParallel, Distributed,
                                                    Efficiency,
                                                    EvalData, EvalSteps, LoraPlus, Method, Neftune, Optimiser,
                                                    Precision, Run, Sharding, Steps)
from lmforge.shared.core.errors import BadInput
from lmforge.shared.core.options import REQUIRED, Opt, Options, declaration, options_of

METHOD = options_of(Method)[0]   # --method as pt and sft take it (every method)


def _methods(*left_out: str) -> Opt:
    """--method without the methods a stage cannot run."""
    return METHOD.but(choices=tuple(m for m in METHODS if m not in left_out))


@declaration
class Training(Options, Base, Method, Optimiser, Steps, Precision, Run):
    """What every stage run by the Hugging Face Trainer shares: the model, its data and the output;
    the method; the optimiser and the steps; precision; the run. A stage names itself (`stage`),
    the packed stages its data may come from (`accepts`), and what its record says it made (`kind`)."""

    stage: ClassVar[str] = ""

    @property
    def kind(self) -> str:
        return "adapter" if self.is_adapter else "model"

    def accepts(self) -> tuple[str, ...]:
        return (self.stage,)

    def decided(self) -> dict:
        """Settings the stage derives from its options, recorded with them."""
        return {}


@declaration
class Supervised(Training, EvalData, Efficiency, EvalSteps, Distributed, ContextParallel):
    """rm and the dpo family: the model, the method, how it trains, the run. pt and sft add LoRA+
    and NEFTune, which touch only their own loss."""


@declaration
class TrainPT(Supervised, LoraPlus, Neftune, Sharding):
    summary: ClassVar[str] = "Continued pre-training on packed text (`data pack --stage pt`)."
    examples: ClassVar[tuple[str, ...]] = (
        "lmforge train pt -m ./base -d corpus.packed -o runs/pt --method full --lr 1e-5",
        "lmforge train pt -m ./base -d book.packed -o runs/pt-long --shift-attn --rope-scaling linear",
    )

    stage = "pt"


@declaration
class TrainSFT(Supervised, LoraPlus, Neftune, Sharding):
    summary: ClassVar[str] = "Supervised fine-tuning on packed chat data (`data pack --stage sft`)."
    examples: ClassVar[tuple[str, ...]] = (
        "lmforge train sft -m ./base -d sft.packed -o runs/sft --method lora --lora-rank 16 --epochs 2",
        "lmforge train sft -m ./base -d sft.packed -o runs/qlora --method lora --quant 4 --checkpointing selective",
        "lmforge train sft -m ./base -d sft.packed -o runs/full --method full --lr 1e-5 --gradient-checkpointing",
    )

    stage = "sft"


@declaration
class TrainRM(Supervised):
    summary: ClassVar[str] = "Reward model: the base + a value head, trained on pairwise data (`data pack --stage rm`)."
    examples: ClassVar[tuple[str, ...]] = (
        "lmforge train rm -m ./sft-model -d rm.packed -o runs/rm",
        "lmforge train rm -m ./sft-model -d rm.packed -o runs/rm --eval-data rm-val.packed --lora-rank 16",
    )

    stage = "rm"
    method: str = _methods("badam", "pissa")   # a reward model keeps a value head beside the adapter

    @property
    def kind(self) -> str:
        return "reward"

    def accepts(self) -> tuple[str, ...]:
        return ("rm", "dpo")


PREF = "Preference loss"
PREFERENCE_LOSSES = ("sigmoid", "ipo", "hinge", "orpo", "simpo", "kto")
REFERENCE_LOSSES = ("sigmoid", "ipo", "hinge", "kto")   # these compare with a reference model


@declaration
class TrainDPO(Supervised):
    summary: ClassVar[str] = "Preference optimisation: DPO, IPO, hinge, ORPO, SimPO, KTO; DPO-ftx with --ftx."
    examples: ClassVar[tuple[str, ...]] = (
        "lmforge train dpo -m ./sft-model -d dpo.packed -o runs/dpo --loss sigmoid --beta 0.1 --ftx 0.5",
        "lmforge train dpo -m ./sft-model -d dpo.packed -o runs/simpo --loss simpo --simpo-gamma 0.5",
        "lmforge train dpo -m ./sft-model -d kto.packed -o runs/kto --loss kto --desirable-weight 1.0",
    )

    stage = "dpo"
    method: str = _methods("badam")

    loss: str = Opt(choices=PREFERENCE_LOSSES, default="sigmoid", panel=PREF,
                    help="sigmoid (DPO), ipo, hinge: with a reference model; orpo, simpo: without; kto: on "
                         "KTO-labelled data.")
    beta: float | None = Opt(default=None, panel=PREF, min=0, min_open=True,
                             help="Strength of the preference term (default 0.1; 2.0 for simpo; ORPO's lambda for "
                                  "orpo).")
    ftx: float = Opt(default=0.0, panel=PREF, min=0,
                     help="DPO-ftx: add FTX x the SFT loss on the chosen answer (logged as sft_loss).")
    simpo_gamma: float = Opt(default=0.5, help="simpo: the target reward margin gamma.", panel=PREF)
    precompute_ref: bool = Opt(default=False, panel=PREF,
                               help="Full tuning: compute reference log-probs once before training instead of keeping "
                                    "a frozen copy.")
    desirable_weight: float = Opt(default=1.0, help="kto: weight of desirable examples.", panel=PREF, min=0,
                                  min_open=True)
    undesirable_weight: float = Opt(default=1.0, help="kto: weight of undesirable examples.", panel=PREF, min=0,
                                    min_open=True)

    def accepts(self) -> tuple[str, ...]:
        return ("kto",) if self.loss == "kto" else ("dpo", "rm")

    @property
    def strength(self) -> float:
        """beta as given, else the loss's own default."""
        return self.beta if self.beta is not None else (2.0 if self.loss == "simpo" else 0.1)

    def decided(self) -> dict:
        return {"beta": self.strength}

    def check_own(self) -> None:
        if self.shift_attn and self.loss in REFERENCE_LOSSES and (not self.is_adapter or self.precompute_ref):
            # TRL loads its own frozen reference (or precomputes), with full attention: the policy's
            # S² log-probs would be compared with full-attention ones from the first step on
            raise BadInput(f"--shift-attn with --loss {self.loss} needs the reference to be the policy's own layers "
                           "(adapter methods, no --precompute-ref)",
                           "use --method lora, or a reference-free loss (--loss orpo or simpo)")


G = "PPO"


@declaration
class TrainPPO(Options):
    """RLHF with PPO: its own loop (a step samples a batch of prompts), so its own settings."""

    summary: ClassVar[str] = "RLHF with PPO: SFT model + reward model, one shared base model in memory."
    examples: ClassVar[tuple[str, ...]] = (
        "lmforge train ppo -m ./sft-model --reward runs/rm -d prompts.packed -o runs/ppo",
        "lmforge train ppo -m ./base --sft runs/sft --reward runs/rm -d prompts.packed -o runs/ppo --kl-coef 0.1",
    )

    stage: ClassVar[str] = "ppo"

    model: str = TRAIN_MODEL.but(help="Base model (directory or Hub id).")
    reward: str = REWARD.but(panel=P)
    data: str = Opt(default=REQUIRED, flags=("--data", "-d"), panel=P, help="Prompts packed with `data pack --stage ppo`.")
    output: Path = TRAIN_OUTPUT.but(help="Output directory (printed on stdout).")
    sft: str | None = Opt(default=None, panel=P,
                          help="The SFT adapter (merged into the base in memory) or SFT model directory.")
    overwrite: bool = TRAIN_OVERWRITE
    resume: bool = RESUME
    layout: str = Opt(choices=("shared", "separate"), default="shared", panel=G,
                      help="shared: one base model serves policy, reference and reward by switching adapters; "
                           "separate: four models.")
    lora_rank: int = LORA_RANK.but(help="Rank of the policy's LoRA adapter.", panel=G)
    lora_alpha: float | None = LORA_ALPHA.but(panel=G)
    lora_target: str = LORA_TARGET.but(help="Modules to adapt (all, or names).", panel=G)
    learning_rate: float = LEARNING_RATE.but(default=1e-5, help="Learning rate.", panel=G)
    batch_size: int = BATCH_SIZE.but(default=8, help="Prompts per PPO step (rollouts).", panel=G)
    mini_batch_size: int = Opt(default=4, help="Rollouts per gradient update.", panel=G)
    ppo_epochs: int = Opt(default=4, help="Passes over each batch of rollouts.", panel=G)
    max_steps: int = MAX_STEPS.but(default=100, help="PPO steps.", panel=G)
    epochs: float | None = EPOCHS.but(default=None, help="Passes over the prompts (overrides --max-steps).", panel=G)
    max_new_tokens: int = MAX_NEW_TOKENS.but(default=64, help="Longest response sampled.", min=None, panel=G)
    temperature: float = TEMPERATURE.but(default=1.0, min=None, panel=G)
    top_k: int = Opt(default=0, help="Top-k sampling (0: off).", panel=G)
    top_p: float = TOP_P.but(panel=G)
    kl_coef: float = Opt(default=0.05, help="Initial per-token KL penalty coefficient.", panel=G, min=0)
    kl_target: float = Opt(default=6.0, help="Adaptive KL target (0: fixed coefficient).", panel=G, min=0)
    kl_horizon: int = Opt(default=10000, help="Adaptive KL horizon.", panel=G)
    gamma: float = Opt(default=1.0, help="Discount.", panel=G, min=0, max=1)
    lam: float = Opt(default=0.95, help="GAE lambda.", panel=G, min=0, max=1)
    clip_range: float = Opt(default=0.2, help="PPO ratio clipping.", panel=G, min=0, min_open=True, max=1,
                            max_open=True)
    clip_range_value: float = Opt(default=0.2, help="Value clipping.", panel=G, min=0, min_open=True)
    vf_coef: float = Opt(default=0.1, help="Weight of the value loss.", panel=G, min=0)
    reward_scale: float = Opt(default=1.0, help="Multiply scores by this.", panel=G)
    reward_clip: float | None = Opt(default=None, help="Clip scores to +-this.", panel=G, min=0, min_open=True)
    reward_norm: bool = Opt(default=False, help="Normalise scores by their running mean and std.", panel=G)
    missing_eos_penalty: float | None = Opt(default=None, panel=G,
                                            help="Subtract this from the score of answers that never stop.")
    whiten_advantages: bool = Opt(default=True, help="Normalise advantages over each batch.", panel=G)
    max_grad_norm: float = MAX_GRAD_NORM.but(panel=G)
    precision: str = PRECISION.but(help="Weights' precision.", panel=G)
    seed: int = SEED.but(panel=R)
    save_steps: int = SAVE_STEPS.but(default=50, help="Checkpoint every N steps.")
    keep_checkpoints: bool = KEEP_CHECKPOINTS.but(help="Keep checkpoints/ at the end.")
    logging_steps: int = LOGGING_STEPS.but(default=1, help="Log every N steps.")
    report: list[str] | None = REPORT


GR = "GRPO"
AG = "Agent"
GRPO_LOSSES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo")


@declaration
class TrainGRPO(Training):
    """Online RL with verifiable rewards, through TRL's GRPOTrainer: a step samples completions
    for a batch of prompts, so batches and steps are its own. It runs in one process (no
    DeepSpeed or FSDP)."""

    summary: ClassVar[str] = ("Online RL with verifiable rewards (GRPO, TRL): prompts packed with `data pack --stage "
                              "ppo`.")
    examples: ClassVar[tuple[str, ...]] = (
        "lmforge train grpo -m ./sft-model -d prompts.packed -o runs/grpo --reward exact --reward format "
        "--reward-weights 1,0.2",
        "lmforge train grpo -m ./sft-model -d prompts.packed -o runs/dapo --reward numeric --loss-type dapo "
        "--clip-range-high 0.28",
        "lmforge train grpo -m ./sft-model -d prompts.packed -o runs/short --reward 'cmd:awk -f short.awk'",
    )

    stage = "grpo"
    method: str = _methods("badam")
    data: str = Opt(default=REQUIRED, flags=("--data", "-d"), panel=P,
                    help="Prompts (with reference answers where the data has them) packed with `data pack --stage ppo`.")
    reward: list[str] | None = REWARD.but(default=None, panel=GR, flags=("--reward", "-r"),
                                          help="A reward (repeat for several; at least one, or an --environment): "
                                               "exact, numeric, format, regex:PATTERN, length:N, cmd:COMMAND (JSON "
                                               "lines in, one number per line out), module:function or "
                                               "file.py:function, or a reward model directory (`train rm`).")
    reward_weights: str | None = Opt(default=None, panel=GR,
                                     help="Weights of the --reward terms, comma-separated in their order (default: 1 "
                                          "each); with --environment, its term may be weighed last.")
    reward_timeout: float = Opt(default=60.0, min=0, min_open=True, panel=GR,
                                help="Seconds a cmd: reward may take per batch; one that takes longer is stopped with "
                                     "its children.")
    batch_size: int = BATCH_SIZE.but(default=4, help="Prompts per device per micro-batch (each sampled "
                                                     "--num-generations times).", panel=GR)
    grad_accum: int = GRAD_ACCUM.but(default=1, panel=GR)
    num_generations: int = Opt(default=4, min=2, panel=GR,
                               help="Group size: completions sampled per prompt; advantages are relative to the group.")
    epochs: float = EPOCHS.but(default=1.0, panel=GR)
    max_steps: int = MAX_STEPS.but(panel=GR)
    max_new_tokens: int = MAX_NEW_TOKENS.but(default=64, panel=GR,
                                             help="Longest completion sampled (with tools or an environment: the "
                                                  "whole episode, what tools and the environment wrote included).")
    temperature: float = TEMPERATURE.but(default=1.0, min_open=True, help="Sampling temperature (above 0: GRPO "
                                                                          "samples).", panel=GR)
    top_p: float = TOP_P.but(panel=GR)
    top_k: int = Opt(default=0, help="Top-k sampling (0: off).", panel=GR)
    kl_coef: float = Opt(default=0.0, min=0, panel=GR,
                         help="KL coefficient beta against the reference (the model without the adapter); 0: no "
                              "reference pass.")
    loss_type: str = Opt(choices=GRPO_LOSSES, default="dapo", panel=GR,
                         help="Loss aggregation (TRL): grpo (per sequence), dr_grpo (constant), dapo (per token), bnpo, "
                              "cispo, sapo.")
    clip_range: float = Opt(default=0.2, help="Ratio clipping epsilon.", panel=GR, min=0, min_open=True, max=1,
                            max_open=True)
    clip_range_high: float | None = Opt(default=None, min=0, min_open=True, panel=GR,
                                        help="Upper clipping epsilon (DAPO's clip-higher; default: --clip-range).")
    num_iterations: int = Opt(default=1, min=1, help="Updates per batch of completions (mu).", panel=GR)
    scale_rewards: str = Opt(choices=("group", "batch", "none"), default="group", panel=GR,
                             help="Divide advantages by the reward std of the group, of the batch, or not at all "
                                  "(Dr. GRPO).")
    mask_truncated: bool = Opt(default=False, panel=GR,
                               help="Leave completions that hit --max-new-tokens out of the loss (DAPO).")
    vllm: bool = Opt(default=False, panel=GR,
                     help="Generate with vLLM colocated on the training GPU (CUDA with vllm installed).")
    log_completions: int = Opt(default=4, min=0, panel=GR,
                               help="At each logging step, write the first prompt of the latest batch with its "
                                    "first N completions, each reward and the total to OUT/completions.jsonl (0: "
                                    "none).")
    tools: str | None = Opt(default=None, panel=AG,
                            help="JSON file of tools the model may call: OpenAI tool schemas, each with a \"command\" "
                                 "(text or a list of words) that reads the call's arguments as JSON on stdin and "
                                 "prints the result.")
    tool: list[str] | None = Opt(default=None, panel=AG,
                                 help="A tool run by a command, NAME=COMMAND (repeat for several; replaces the command "
                                      "of a --tools entry of that name).")
    environment: str | None = Opt(default=None, panel=AG,
                                  help="A command that plays episodes over JSON lines (docs/guides/agents.md); its "
                                       "reward is one more reward term, env.")
    max_turns: int = Opt(default=4, min=1, panel=AG, help="Model turns per episode at most.")
    tool_timeout: float = Opt(default=10.0, min=0, min_open=True, panel=AG,
                              help="Seconds a tool call may take; it is then stopped with its children and the model "
                                   "reads an error.")
    tool_output_cap: int = Opt(default=4096, min=1, panel=AG,
                               help="Bytes of a tool's output the model reads; the rest is cut.")
    environment_timeout: float = Opt(default=60.0, min=0, min_open=True, panel=AG,
                                     help="Seconds the environment may take to answer one line.")
    save_steps: int = SAVE_STEPS.but(default=50)
    logging_steps: int = LOGGING_STEPS.but(default=1)

    def accepts(self) -> tuple[str, ...]:
        return ("ppo",)

    @property
    def agentic(self) -> bool:
        """Episodes of several turns: tools the model calls, or an environment it plays."""
        return bool(self.tools or self.tool or self.environment)

    def check_own(self) -> None:
        if not self.reward and not self.environment:
            raise BadInput("give at least one --reward (or an --environment, whose reward is a term)",
                           "e.g. --reward exact")
        if self.tools is not None and not Path(self.tools).is_file():
            raise BadInput(f"--tools {self.tools}: no such file", "give a JSON file listing the tools")
