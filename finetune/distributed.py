"""Several processes, one run: `ft train --nproc N` relaunches itself through `accelerate launch`.

accelerate (torchrun underneath) starts the processes and sets RANK / LOCAL_RANK / WORLD_SIZE;
transformers' Trainer does the rest (DDP, FSDP or DeepSpeed from its arguments, a sampler
seeded the same on every rank and split by accelerate, so step k sees the same examples for any
N). ft adds three things:

- the global batch the recipe names (batch_size × grad_accum) is kept whatever N is: each rank
  gets a share of it, accumulated if the share is larger than batch_size;
- only rank 0 writes the run folder, logs and the eval report; the others train and exit;
- resuming under a different N is allowed where the checkpoint does not depend on N (DDP keeps
  full optimizer state on every rank) and refused, with the N to use, where it does (FSDP and
  DeepSpeed shard the optimizer state by rank).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from finetune.errors import UserError
from finetune.recipe import Recipe


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place, from the variables torchrun / accelerate launch set."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                 int(os.environ.get("WORLD_SIZE", 1)))


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device=None) -> bool:
    """True on every rank when it is true on any. A decision that stops the run must be taken by
    all ranks together: a rank that raises alone leaves the others waiting in the next collective
    for ever (under FSDP each rank sees only its shard of the adapters)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    vote = torch.tensor([1.0 if flag else 0.0], device=device or "cpu")
    dist.all_reduce(vote, op=dist.ReduceOp.MAX)
    return bool(vote.item())


def start(w: World) -> None:
    """Join the process group (gloo on CPU, nccl on GPU) before anything collective runs."""
    if w.size > 1:
        from accelerate import PartialState

        PartialState()


@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int  # examples per rank per forward pass
    grad_accum: int  # forward passes per optimizer step
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size


def batch_plan(recipe: Recipe, world_size: int) -> BatchPlan:
    """Split the recipe's global batch (batch_size × grad_accum) over the ranks."""
    total = recipe.train.batch_size * recipe.train.grad_accum
    if total % world_size:
        raise UserError(f"the global batch ({recipe.train.batch_size} × {recipe.train.grad_accum} = {total}) does not "
                        f"split evenly over {world_size} processes", "train.batch_size",
                        f"use a process count that divides {total}, or a batch_size × grad_accum that "
                        f"{world_size} divides")
    share = total // world_size
    micro = max(d for d in range(1, min(recipe.train.batch_size, share) + 1) if share % d == 0)
    return BatchPlan(micro, share // micro, world_size)


def shards(recipe: Recipe) -> bool:
    """FSDP or DeepSpeed place (and shard) the weights, not from_pretrained. Sharded 4-bit weights
    need every stored tensor in one dtype, and unsloth's LoRA kernels stay out (finetune/train/backends.py)."""
    return world().size > 1 and recipe.distributed.strategy != "ddp"


def check_strategy(recipe: Recipe, world_size: int, gpu: bool) -> None:
    strategy = recipe.distributed.strategy
    if world_size == 1 or strategy == "ddp":
        return
    if not gpu:
        raise UserError(f"distributed.strategy '{strategy}' needs CUDA GPUs", "distributed.strategy",
                        "use strategy: ddp on CPU (gloo), or run on GPUs")
    if strategy == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise UserError("distributed.strategy is 'deepspeed' but deepspeed is not installed",
                            "distributed.strategy", "pip install deepspeed, or use fsdp / ddp") from None


def trainer_arguments(recipe: Recipe, decoder_layer: str) -> dict:
    """The TrainingArguments each strategy needs, with the settings QLoRA needs under it.

    Sharded QLoRA follows peft's FSDP-QLoRA and DeepSpeed-ZeRO3-QLoRA guides: 4-bit storage and
    every other tensor in the compute dtype (loading.quantization_config, train/lora.prepare_for_training),
    gradient checkpointing set up once on the model (FSDP's own activation checkpointing stays off:
    both would recompute every layer twice)."""
    d = recipe.distributed
    if d.strategy == "ddp":
        # adapters only: no parameter goes unused, and searching for them costs a pass per step
        return {"ddp_find_unused_parameters": False}
    if d.strategy == "fsdp":
        # FSDP1 with use_orig_params false, as the guide: FSDP2 (transformers' default) turns a
        # bitsandbytes Params4bit into a plain tensor when it gathers it, losing its quantization
        # state (accelerate issue 3983), and LoRA's trainable and frozen weights need separate flat
        # parameters (transformers applies peft's fsdp_auto_wrap_policy for that).
        return {"fsdp": True,
                "fsdp_config": {"version": 1, "reshard_after_forward": "full_shard",
                                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                "transformer_layer_cls_to_wrap": [decoder_layer], "use_orig_params": False,
                                "cpu_ram_efficient_loading": True, "sync_module_states": True,
                                "cpu_offload": d.cpu_offload, "activation_checkpointing": False}}
    zero = {"stage": d.zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    if d.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if d.zero_stage == 3:  # the adapter is gathered into whole tensors when it is saved
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {"deepspeed": {"zero_optimization": zero, "bf16": {"enabled": "auto"},
                          "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                          "gradient_clipping": "auto", "train_batch_size": "auto"}}


def fsdp_environment(decoder_layer: str) -> dict[str, str]:
    """What FSDP needs in the environment, which `accelerate launch --multi_gpu` (ft's launcher)
    does not set: transformers loads with FSDP's low-RAM path (rank 0 reads, the others get meta
    tensors) only when the launcher said FSDP; and peft's fsdp_auto_wrap_policy, which the Trainer
    applies, wraps every class in the model's `_no_split_modules` unless told otherwise: Qwen3.5's
    text-only model inherits "Qwen3_5VisionBlock" there and has no such block, so the policy
    raises "Could not find the transformer layer class to wrap" before step 1."""
    return {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_TRANSFORMER_CLS_TO_WRAP": decoder_layer}


def check_resume(old, recipe: Recipe, world_size: int) -> str | None:
    """None when resuming under this N is fine; otherwise raises. Returns a note when N changed.
    `old`: the run's Manifest (finetune/run.py), or None."""
    before = old.distributed if old is not None else None
    if before is None or before.world_size == world_size:
        return None
    if before.strategy != "ddp":
        raise UserError(f"this run's checkpoints were written by {before.world_size} processes under "
                        f"{before.strategy}, which shards optimizer state by rank", "--nproc",
                        f"resume with --nproc {before.world_size} (× nodes as before)")
    return (f"resuming with {world_size} processes (was {before.world_size}); the global batch is unchanged, "
            "so every step sees the same examples")


def launch_command(args: list[str], nproc: int, nnodes: int, node_rank: int, master_addr: str,
                   master_port: int) -> list[str]:
    """`accelerate launch` running `ft train` with the same arguments in every process."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(nproc * nnodes), "--num_machines", str(nnodes), "--machine_rank", str(node_rank),
            "--main_process_ip", master_addr, "--main_process_port", str(master_port),
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "finetune", "train", *args]
