"""Preflight: will this run, and its export, fit? Answered before any training is paid for.

Disk is checked where each thing is written (the run folder's filesystem, the HF cache for a
download) against everything the run and a default export will write: checkpoints, the adapter,
the 16-bit GGUF intermediate and the quantized file. Memory is estimated for the 4-bit model and
reported; a run is refused only when the estimate exceeds what is available by a clear margin,
since activation memory is an estimate. `FT_ASSUME_FREE_BYTES` overrides the measured free disk
(to ask "would this fit on a machine with N bytes free?").
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UserError
from finetune.serving import GGUF_BYTES_PER_PARAM, verify_logits_bytes

NF4_BYTES_PER_PARAM = 0.52  # 4 bits + double-quantized absmax per 64 weights
def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def free_bytes(path: Path) -> int:
    override = os.environ.get("FT_ASSUME_FREE_BYTES")
    if override:
        return int(override)
    path = path if path.exists() else next(p for p in path.parents if p.exists())
    return shutil.disk_usage(path).free


def available_ram() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def count_parameters(model, targets: list[str], r: int) -> tuple[int, int, int]:
    """(all parameters, embedding + lm_head parameters, LoRA parameters) of a model on the meta
    device (finetune.loading.skeleton): nothing is allocated."""
    import torch

    total = sum(p.numel() for p in model.parameters())
    embed = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" in n or "lm_head" in n)
    lora = sum(r * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets)
    return total, embed, lora


@dataclass
class Need:
    what: str
    where: Path
    bytes: int


def check_disk(needs: list[Need], action: str) -> list[str]:
    """Group needs by filesystem; refuse with the numbers when any does not fit."""
    lines, problems = [], []
    by_device: dict[int, list[Need]] = {}
    for need in needs:
        probe = need.where if need.where.exists() else next(p for p in need.where.parents if p.exists())
        by_device.setdefault(os.stat(probe).st_dev, []).append(need)
    for group in by_device.values():
        total = sum(n.bytes for n in group)
        free = free_bytes(group[0].where)
        detail = ", ".join(f"{n.what} {human(n.bytes)}" for n in group)
        lines.append(f"disk at {group[0].where}: needs {human(total)} ({detail}); free {human(free)}")
        if total > free:
            problems.append(f"{action} needs {human(total)} on {group[0].where} ({detail}) but only "
                            f"{human(free)} is free")
    if problems:
        raise UserError(problems[0], "preflight", "free some space, or point --output (and HF_HOME) at a larger disk")
    return lines


def trl_version() -> str:
    from importlib.metadata import version

    return version("trl")


def lm_head_tiled(gpu: bool) -> bool:
    """Whether TRL's loss never builds the full [tokens, vocabulary] logits: TRL >= 1.16 computes
    log-probabilities in tiles everywhere (trl/kernels/chunked_logprob.py); TRL 1.15 (unsloth's pin,
    and the GPU image's) always uses its tiled Triton LM head on CUDA, and the full logits on a CPU."""
    from packaging.version import Version

    return Version(trl_version()) >= Version("1.16") or gpu


def logits_bytes(tokens: int, vocab: int, gpu: bool) -> int:
    """The loss's logits, forward and backward in fp32: on a CPU, ft's head (finetune/lm_head.py): a
    row tile and two of its temporaries, and the bf16 probabilities it keeps for the backward; on a
    GPU, one [4096 token, 32768 vocabulary] tile where TRL tiles them; else the whole array."""
    if lm_head_tiled(gpu) and not gpu:
        from finetune import lm_head

        return min(tokens * vocab * 4, lm_head.ROW_TILE_BYTES) * 3 + min(tokens * vocab * 2, lm_head.KEPT_PROBS_BYTES)
    if lm_head_tiled(gpu):
        return min(tokens, 4096) * min(vocab, 32768) * 4 * 2
    return tokens * vocab * 4 * 2


@dataclass
class TrainPlan:
    lines: list[str]  # what the estimate says, printed and kept in the manifest
    gradient_checkpointing: bool  # train.gradient_checkpointing with "auto" decided


def preflight_train(recipe, base, skeleton, run_root: Path, targets: list[str]) -> TrainPlan:
    """The estimate, and whether to recompute activations; raises UserError when the run or its
    export cannot fit. `skeleton`: finetune.loading.skeleton(recipe, base)."""
    local = Path(base.path).is_dir()
    text_config = skeleton.config
    params, embed, lora = count_parameters(skeleton.model, targets, recipe.lora.r)
    quant = recipe.export.quant
    needs = [
        Need("checkpoints", run_root, lora * 12 * (recipe.train.save_total_limit + 1)),  # weights + Adam
        Need("adapter", run_root, lora * 4),
        Need("16-bit GGUF", run_root, int(params * 2)),
        Need(f"{quant} GGUF", run_root, int(params * GGUF_BYTES_PER_PARAM[quant])) if quant not in ("f16", "bf16")
        else Need("", run_root, 0),
        Need("verification logits (at most)", run_root,
             verify_logits_bytes(recipe.data.max_length, getattr(text_config, "vocab_size", 0))),
    ]
    if not local:
        from huggingface_hub import constants

        needs.append(Need("base download", Path(constants.HF_HUB_CACHE), int(params * 2)))
    lines = check_disk([n for n in needs if n.bytes], "this run and its export")
    import torch

    gpu = torch.cuda.is_available()
    where = "GPU" if gpu else "RAM"
    available = torch.cuda.mem_get_info()[0] if gpu else available_ram()

    from finetune.loading import keep_dequantized_copies

    copies = keep_dequantized_copies(recipe, (params - embed) * 4, available)

    def estimate(checkpointing: bool) -> Memory:
        return memory_estimate(recipe, text_config, params, embed, lora, gpu, checkpointing, copies)

    checkpointing = recipe.train.gradient_checkpointing
    if checkpointing == "auto":  # recomputation costs a third of the step: only when memory asks for it
        checkpointing = not available or estimate(False).total > available / 2
    memory = estimate(checkpointing)
    lines.append(f"gradient checkpointing: {'on' if checkpointing else 'off'}"
                 + (" (auto)" if recipe.train.gradient_checkpointing == "auto" else ""))
    if not gpu and recipe.quantization.load_in_4bit:
        lines.append(f"kept dequantized copies of the 4-bit weights: {'on' if copies else 'off'}"
                     + (" (auto)" if recipe.quantization.cpu_dequantized_copies == "auto" else ""))
    lines.append(f"{where}: about {human(memory.total)} (weights {human(memory.weights)}, activations "
                 f"{human(memory.activations)}, logits {human(memory.logits)}, process and loading "
                 f"{human(memory.process)})" + (f"; available {human(available)}" if available else ""))
    if available and memory.total > 1.5 * available:
        raise UserError(f"training needs about {human(memory.total)} of {where} but {human(available)} is available",
                        "preflight", "lower train.batch_size or data.max_length, or turn on "
                        "train.gradient_checkpointing")
    return TrainPlan(lines, checkpointing)


@dataclass
class Memory:
    """Training memory, by part (bytes)."""

    weights: int
    activations: int
    logits: int
    process: int  # torch and the libraries, and loading's largest fp32 upcast
    adapters: int  # LoRA weights, gradients and Adam state

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.logits + self.process + self.adapters


def memory_estimate(recipe, text_config, params: int, embed: int, lora: int, gpu: bool,
                    checkpointing: bool, kept_copies: bool = False) -> Memory:
    """The estimate preflight prints, for a model of this config on a GPU (bf16 compute) or a CPU
    (fp32); also what README's per-size table is computed from (finetune/sizes.py, without the
    kept copies: the least a CPU run needs). `kept_copies`: the 4-bit weights' dequantized copies
    on a CPU (finetune/dequantized.py), and the LM head's for the loss (finetune/lm_head.py), in the
    dtype the matmuls run in."""
    dense_bytes = 2 if gpu else 4  # compute dtype: bf16 on GPU, fp32 on CPU
    four_bit = recipe.quantization.load_in_4bit
    # What the 4-bit quantizer leaves out (the embedding and lm_head above all: 2.03 B parameters
    # in Qwen3.5-9B) stays in the compute dtype: bf16 on a GPU (ft skips peft's fp32 upcast there,
    # train/lora.py; unsloth keeps it bf16 too), fp32 on a CPU.
    embed_bytes = dense_bytes
    hidden = getattr(text_config, "hidden_size", 0)
    weights = int((params - embed) * (NF4_BYTES_PER_PARAM if four_bit else dense_bytes) + embed * embed_bytes)
    if kept_copies and four_bit and not gpu:
        from finetune.loading import cpu_bf16
        from finetune.lm_head import head_copy_bytes

        weights += (params - embed) * (2 if cpu_bf16(recipe) else 4)
        # and ft's CPU loss head keeps the frozen fp32 LM head's bf16 copy (finetune/lm_head.py)
        weights += head_copy_bytes(getattr(text_config, "vocab_size", 0), hidden) if cpu_bf16(recipe) else 0
    layers = getattr(text_config, "num_hidden_layers", 0)
    tokens = recipe.train.batch_size * recipe.data.max_length
    logits = logits_bytes(tokens, getattr(text_config, "vocab_size", 0), gpu)
    # Measured at the real widths and vocabularies (bench/full_size.py): the process itself (torch,
    # transformers, TRL, peft, bitsandbytes) takes about 0.5 GiB, and while the model loads, the
    # largest tensor kept out of 4-bit exists in 16-bit beside its fp32 upcast.
    largest = max(getattr(text_config, "vocab_size", 0), 1) * hidden * 2
    process = (512 << 20) + (largest if four_bit and not gpu else 0)  # no fp32 upcast on a GPU
    activations = tokens * hidden * layers * (4 if checkpointing else 34) * (dense_bytes // 2)
    # Adapters with AdamW: weight, gradient and two moments. On a GPU TRL casts a quantized
    # model's trainable parameters to bf16, and torch's AdamW keeps its moments in the parameter's
    # dtype: 8 bytes a parameter; fp32 on a CPU (ft casts them back, train/trainer.keep_adapters_fp32): 16.
    return Memory(weights, activations, logits, process, lora * (8 if gpu else 16))


def preflight_export(base_dir: Path, out: Path, quant: str, hf: bool, verify_logits: int = 0) -> list[str]:
    base = weight_bytes(base_dir)
    params = base // 2  # checkpoints ship in 16-bit
    needs = [Need("16-bit GGUF", out, params * 2)]
    if verify_logits:
        needs.append(Need("verification logits (at most)", out, verify_logits))
    if quant not in ("f16", "bf16"):
        needs.append(Need(f"{quant} GGUF", out, int(params * GGUF_BYTES_PER_PARAM[quant])))
    if hf:
        needs.append(Need("merged safetensors", out, base))
    return check_disk(needs, "this export")
