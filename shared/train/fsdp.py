"""`--fsdp full|hybrid|offload` (train pt, sft): the model sharded across the processes with
PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`), on CPUs (gloo) and GPUs (nccl) alike.

Each decoder layer is one FSDP unit and the rest of the model (embeddings, final norm, output
layer, a vision tower) the root unit: a layer's whole weights exist only while it computes, its
gradients are reduce-scattered as backward leaves it, and each process keeps only its shard of
the weights, of their gradients and of the optimizer state.

- full: shards across every process; hybrid: across the processes of each node (torchrun's
  LOCAL_WORLD_SIZE), replicated across nodes (gradients all-reduced between the replicas): less
  traffic over the slower links between nodes; offload: full, with the shards, their gradients
  and the optimizer step in CPU memory (CUDA only: on CPU processes there is nothing to offload).
- Mixed precision: with bf16 the layers compute in bf16 from weights kept in their own dtype
  (fp32 masters for full tuning, fp32 adapters over a bf16 base) and gradients are reduced in
  fp32 (FSDP2's MixedPrecisionPolicy).
- LoRA and full tuning; gradient checkpointing (full and selective) runs inside the units;
  --context-parallel splits rows within groups of processes while FSDP shards over all of them.

lmforge shards the model itself, before the trainer is built (so that every optimizer, LoRA+'s
included, sees the sharded parameters), and tells the Trainer's accelerator to leave it as it is
(no DDP around it): accelerate's own FSDP is never switched on, so that the same code runs on
CPUs, where accelerate turns FSDP off. Checkpoints are sharded (sharded.py); the final model or
adapter is gathered into one ordinary Hugging Face directory (`save_whole`).
"""

from __future__ import annotations

import os
from pathlib import Path

from lmforge.shared.core.errors import BadInput


def enabled(o) -> bool:
    return bool(getattr(o, "fsdp", None))


def check(o, device) -> None:
    """What --fsdp refuses once the device is known (the options alone: Sharding.check_own)."""
    if not enabled(o):
        return
    if device.kind == "mps":
        raise BadInput("--fsdp runs on CUDA GPUs or CPUs, not on Apple's MPS", "drop --fsdp")
    if o.fsdp == "offload" and device.kind != "cuda":
        raise BadInput("--fsdp offload keeps the shards in CPU memory, away from the GPUs; these processes run on "
                       "the CPU already", "use --fsdp full")
    if device.dtype_name == "fp16":
        raise BadInput("--fsdp trains in bf16 or fp32, not fp16 (no loss scaling for sharded gradients)",
                       "use --precision bf16 (or fp32), or --deepspeed on GPUs without bf16")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if o.fsdp == "hybrid" and world % local:
        raise BadInput(f"--fsdp hybrid: {world} processes are not whole nodes of {local}",
                       "start the same number of processes on every node (torchrun --nproc-per-node)")


def _mesh(o, device):
    """One dimension (full, offload), or replicas x shards (hybrid across nodes)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if o.fsdp == "hybrid" and world > local:
        return init_device_mesh(device.kind, (world // local, local), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device.kind, (world,), mesh_dim_names=("shard",))


def _policy(device):
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.dtype_name == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(model, o, device) -> None:
    """Shard `model` (PEFT-wrapped or not) in place: each decoder layer, then the root."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    from lmforge.shared.train.methods import decoder_layers

    options = {"mesh": _mesh(o, device), "mp_policy": _policy(device)}
    if o.fsdp == "offload":
        options["offload_policy"] = CPUOffloadPolicy()
    _, layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)
    model.lmforge_fsdp = o.fsdp


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def arguments_class():
    """TrainingArguments for a sharded model: the Trainer must not move it (FSDP placed each shard;
    offloaded shards stay in CPU memory). `place_model_on_device` is the property transformers
    documents for integrations to override."""
    from transformers import TrainingArguments

    class ShardedArguments(TrainingArguments):
        @property
        def place_model_on_device(self) -> bool:
            return False

    return ShardedArguments


def prepare(trainer, o) -> None:
    """The trainer a stage built, made to train the sharded model: its accelerator prepares the
    model without wrapping it (the model reduces its own gradients), and its checkpoints and final
    save are sharded and gathered (patches/fsdp.py)."""
    from lmforge.shared.train.patches.fsdp import ShardedTrainerMixin

    accelerator = trainer.accelerator
    original = accelerator.prepare_model

    def prepare_model(model, device_placement=None, evaluation_mode=False):
        if is_sharded(model):   # autocast where the run asks for it; no DDP, no device move
            return original(model, device_placement=False, evaluation_mode=True)
        return original(model, device_placement=device_placement, evaluation_mode=evaluation_mode)

    accelerator.prepare_model = prepare_model
    cls = type(trainer)
    trainer.__class__ = type(f"Sharded{cls.__name__}", (ShardedTrainerMixin, cls), {})
    trainer.lmforge_fsdp = o.fsdp


def _gathered(model, adapter: bool) -> dict:
    """The whole weights in CPU memory on rank 0 ({} elsewhere; collective). An adapter run gathers
    what trains and the embeddings (PEFT saves those too when the vocabulary grew), not the base."""
    from torch.distributed.tensor import DTensor

    wanted = None
    if adapter:
        embeddings = set()
        causal = model.get_base_model()
        for layer in (causal.get_input_embeddings(), causal.get_output_embeddings()):
            if layer is not None and getattr(layer, "weight", None) is not None:
                embeddings.add(id(layer.weight))
        wanted = {n for n, p in model.named_parameters() if p.requires_grad or id(p) in embeddings}
    main = _rank() == 0
    parameters = dict(model.named_parameters(remove_duplicate=False))
    state: dict = {}
    done: dict[int, object] = {}   # tied weights (one parameter, two names) stay one tensor: saved once
    for name, tensor in model.state_dict().items():
        if wanted is not None and name not in wanted:
            continue
        same = id(parameters[name]) if name in parameters else None
        if same is not None and same in done:
            state[name] = done[same]
            continue
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()   # collective: every process walks the same names in the same order
        whole = tensor.detach().to("cpu", copy=True) if main else None
        if main:
            state[name] = whole
        if same is not None:
            done[same] = whole
        del tensor
    return state


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def save_whole(trainer, output_dir: str) -> None:
    """The final model or adapter as one ordinary directory (what `adapter merge`, `eval`, `serve`,
    `model export` and transformers read), gathered from the shards on rank 0. Collective."""
    import torch.distributed as dist

    model = trainer.model
    adapter = hasattr(model, "peft_config")
    state = _gathered(model, adapter)
    if _rank() == 0:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        _save_pretrained(model, out, state)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _save_pretrained(model, out: Path, state: dict) -> None:
    """save_pretrained from the gathered tensors; the saved config names the model's own class,
    not the class FSDP made of it."""
    import json

    model.save_pretrained(str(out), state_dict=state)
    config = out / "config.json"
    if config.exists():
        data = json.loads(config.read_text())
        data["architectures"] = [name.removeprefix("FSDP") for name in data.get("architectures") or []]
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
