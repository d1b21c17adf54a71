"""The loss's LM head on a CPU: TRL's fused head, scored only where labels are, at a CPU's speed.

TRL (1.16) never builds the [tokens, vocabulary] logits: its SFT loss calls a fused head
(`_ChunkedLogProbFunction`) that projects hidden states in [4096, 32768] tiles. Off Triton it has
two costs a CPU pays in full:

- it projects every position, labelled or not (`score_only_trained_positions` turns on TRL's own
  compact path instead);
- its backward accumulates the hidden states' gradient in fp32 GEMMs, one per 32768-column tile,
  each upcasting the tile and the head's weight from bf16, and it casts the fp32 head (a CPU model
  is fp32; Qwen3.5-0.8B's tied head is 254 M parameters) to bf16 again in every forward and every
  backward. On the laptop recipe's shape that is 1.9 s of a micro-step for 200 labelled rows.

`CpuLogProbs` computes the same outputs (log-probabilities, entropy, whether the label is the
argmax) with one GEMM per row tile against a bf16 copy of the frozen head kept across steps
(where the 4-bit weights' copies are kept: RAM allows, finetune/dequantized.py), and
its backward is one bf16 GEMM over the whole vocabulary (oneDNN accumulates in fp32 and rounds
once, as autocast's own linear backward does): 0.8 s for the same rows. Where the rows are few,
the probabilities are kept in bf16 for the backward instead of projecting again. Its
vocabulary-wide tiles are kept from one call to the next (`Workspace`), so the kernel does not
fault their pages in again at every pass. tests/test_lm_head.py holds it to an fp64 reference and
to TRL's own function.

Written here because no library has one: Liger's fused linear cross-entropy and TRL's kernels are
Triton (GPU) kernels, and TRL's torch path is the one described above. Anything TRL's head
supports that this does not (a bias, softcapping, a logit scale, a temperature, a trained head,
the other optional outputs, a GPU) goes to TRL's function unchanged.
"""

from __future__ import annotations

import torch

ROW_TILE_BYTES = 128 << 20  # one row tile's fp32 logits: 128 rows of Qwen3.5's 248,320 columns
KEPT_PROBS_BYTES = 512 << 20  # bf16 probabilities kept for the backward, at most; else projected again
OUTPUTS = ("log_probs", "entropy", "is_top1")  # what TRL's SFT asks of its head


def keep_head_copy(model) -> None:
    """Let the loss keep the LM head's copy in the matmul dtype across steps: set where the
    4-bit weights' copies are kept (loading.keep_dequantized_copies decides for both; preflight
    counts both)."""
    head = model.get_output_embeddings()
    if head is not None:
        head.weight.ft_keep_copy = True


def head_copy(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` in `dtype`: where the copy may be kept, cast once and kept on the weight itself
    while it is unchanged (it is frozen; an in-place change bumps its version, a replaced tensor
    has no copy yet); else cast on every call, as autocast would."""
    if weight.dtype == dtype:
        return weight.detach()
    if not getattr(weight, "ft_keep_copy", False):
        return weight.detach().to(dtype)
    stamp = (weight._version, weight.data_ptr(), dtype)
    kept = getattr(weight, "ft_head_copy", None)
    if kept is None or kept[0] != stamp:
        kept = (stamp, weight.detach().to(dtype))
        weight.ft_head_copy = kept
    return kept[1]


def head_copy_bytes(vocab: int, hidden: int) -> int:
    """What the kept bf16 head takes (preflight counts it on a CPU under bf16 autocast)."""
    return vocab * hidden * 2


def row_tiles(rows: int, vocab: int):
    step = max(1, ROW_TILE_BYTES // (vocab * 4))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


class Workspace:
    """The head's vocabulary-wide tiles, kept from one call to the next. Each pass needs several
    [rows, 248,320] tensors (the bf16 product, its fp32 copy, the exponentials, the kept
    probabilities: 60-130 MB each at the laptop recipe's rows), and glibc maps every block that
    large afresh and unmaps it when freed, so each pass faulted in and zeroed them again, page by
    page: 385,000 faults and 2.09 s for a forward and backward over 190 rows, against 1.0 s
    without (bench/RESULTS.md 20). Kept here, at the largest size asked so far (rows rounded up
    to 64), they are faulted in once. (Keeping every freed block instead, glibc's `mallopt`,
    fragmented the heap over an epoch: finetune/allocator.py.)"""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}
        self.probs_claims = 0  # which forward's probabilities the "probs" buffer holds

    def take(self, name: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """A contiguous [rows, cols] view of the named buffer; its contents are whatever was
        written last."""
        buffer = self.buffers.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < rows * cols:
            buffer = self.buffers[name] = torch.empty(-(-rows // 64) * 64 * cols, dtype=dtype)
        return buffer[: rows * cols].view(rows, cols)

    def claim_probs(self) -> int:
        self.probs_claims += 1
        return self.probs_claims

    def release(self) -> None:
        self.buffers.clear()


WORKSPACE = Workspace()


def release_workspace() -> None:
    """Free the head's kept tiles (after training, before an evaluation loads another model)."""
    WORKSPACE.release()


def project(hidden: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 logits of a row tile, `hidden @ w.T` in w's dtype (oneDNN accumulates in fp32 and
    rounds once), in the workspace's "logits" buffer."""
    rows, vocab = hidden.shape[0], w.shape[0]
    logits = WORKSPACE.take("logits", rows, vocab, torch.float32)
    if w.dtype == torch.float32:
        return torch.mm(hidden.to(w.dtype), w.t(), out=logits)
    low = torch.mm(hidden.to(w.dtype), w.t(), out=WORKSPACE.take("product", rows, vocab, w.dtype))
    return logits.copy_(low)


class CpuLogProbs(torch.autograd.Function):
    """Per-row log p(target), entropy and is-argmax of `hidden @ weight.T`, in row tiles; the
    matmuls in autocast's dtype where it is on (else the hidden states'), the softmax in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, want_entropy: bool, want_top1: bool):
        ctx.set_materialize_grads(False)
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else hidden.dtype
        w = head_copy(weight, dtype)
        rows, vocab = hidden.shape[0], w.shape[0]
        keep = hidden.requires_grad and rows * vocab * w.element_size() <= KEPT_PROBS_BYTES
        log_z = hidden.new_empty(rows, dtype=torch.float32)
        log_probs, entropy = torch.empty_like(log_z), torch.empty_like(log_z)
        top1 = torch.empty(rows, dtype=torch.bool)
        probs = WORKSPACE.take("probs", rows, vocab, dtype) if keep else None
        with torch.autocast("cpu", enabled=False):
            for start, end in row_tiles(rows, vocab):
                z = project(hidden[start:end], w)
                if want_top1:  # argmax gives the first maximum: TRL's "target >= max, > every column before"
                    top1[start:end] = z.argmax(dim=-1) == targets[start:end]
                top = z.amax(dim=-1, keepdim=True)
                z.sub_(top)  # from here z is z - max: every exponential at most 1
                target = z.gather(1, targets[start:end, None])[:, 0]
                e = torch.exp(z, out=WORKSPACE.take("exp", end - start, vocab, torch.float32))
                total = e.sum(dim=-1)
                log_total = total.log()
                log_z[start:end] = top[:, 0] + log_total
                log_probs[start:end] = target - log_total
                if want_entropy:  # -sum p log p = log total - sum e (z - max) / total; a row dot, no temporary
                    entropy[start:end] = log_total - torch.bmm(e.unsqueeze(1), z.unsqueeze(2))[:, 0, 0] / total
                if keep:
                    probs[start:end] = e.div_(total[:, None])
        ctx.dtype = dtype
        ctx.save_for_backward(hidden, weight, targets, log_z, entropy)
        # the probabilities live in the workspace: used only if no forward has claimed it since
        ctx.probs, ctx.probs_claim = probs, WORKSPACE.claim_probs() if keep else None
        ctx.mark_non_differentiable(top1)
        return log_probs, entropy if want_entropy else None, top1 if want_top1 else None

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, _grad_top1):
        hidden, weight, targets, log_z, entropy = ctx.saved_tensors
        if grad_log_probs is None and grad_entropy is None:
            return None, None, None, None, None
        w = head_copy(weight, ctx.dtype)
        vocab = w.shape[0]
        kept = ctx.probs is not None and ctx.probs_claim == WORKSPACE.probs_claims and grad_entropy is None
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype)
        with torch.autocast("cpu", enabled=False):
            for start, end in row_tiles(hidden.shape[0], vocab):
                rows = torch.arange(end - start)
                if kept:
                    p = WORKSPACE.take("logits", end - start, vocab, torch.float32).copy_(ctx.probs[start:end])
                else:
                    log_p = project(hidden[start:end], w).sub_(log_z[start:end, None])
                    p = torch.exp(log_p) if grad_entropy is not None else log_p.exp_()
                if grad_entropy is not None:  # d entropy / dz_j = -p_j (log p_j + entropy); rarely asked
                    grad = -grad_entropy[start:end, None] * p * (log_p + entropy[start:end, None])
                    if grad_log_probs is not None:
                        grad -= grad_log_probs[start:end, None] * p
                else:
                    grad = p.mul_(-grad_log_probs[start:end, None])  # in place: p is not needed again
                if grad_log_probs is not None:  # d log p_target / dz_j = 1[j = target] - p_j
                    grad[rows, targets[start:end]] += grad_log_probs[start:end]
                low = WORKSPACE.take("product", end - start, vocab, ctx.dtype).copy_(grad)
                grad_hidden[start:end] = (low @ w).to(hidden.dtype)
        return grad_hidden, None, None, None, None


def handled_here(hidden, weight, bias, temperature, softcap, logit_scale, outputs) -> bool:
    return (hidden.device.type == "cpu" and bias is None and not weight.requires_grad and temperature == 1.0
            and softcap is None and logit_scale == 1.0 and "log_probs" in outputs and set(outputs) <= set(OUTPUTS))


def fused_head_for_cpu(trl_function):
    """TRL's `_ChunkedLogProbFunction` with the CPU cases it can take sent to CpuLogProbs; the
    same call signature and the same five outputs (None where not asked)."""

    class FusedHead:
        ft_cpu = True

        @staticmethod
        def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0,
                  outputs=OUTPUTS):
            if not handled_here(hidden, weight, bias, temperature, softcap, logit_scale, outputs):
                return trl_function.apply(hidden, weight, bias, targets, temperature, chunk_size, softcap,
                                          logit_scale, outputs)
            log_probs, entropy, top1 = CpuLogProbs.apply(hidden, weight, targets, "entropy" in outputs,
                                                         "is_top1" in outputs)
            return log_probs, entropy, None, None, top1

    return FusedHead


def score_only_trained_positions() -> bool:
    """TRL (1.16) projects hidden states through the LM head in tiles and, on devices without
    Triton, for every position, labelled or not: its reason is Neuron, where a changing number of
    positions recompiles the graph. An eager CPU has nothing to recompile, and in a chat SFT most
    positions are prompt (two thirds of a support ticket), each costing a vocabulary-wide
    projection forward and backward: 31% of a SmolLM2 step on 2 cores (49,152 rows). TRL's own
    compact path (only positions whose label is not -100, scattered back as zeros) gives the same
    loss and gradients; this turns it on for the CPU, and sends the CPU's rows to CpuLogProbs.
    Returns whether TRL has the switches (ft's head needs the compact path: it scores given rows)."""
    import torch
    from trl.trainer import utils as trl_utils

    decide = getattr(trl_utils, "_use_triton", None)
    head = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if decide is None or head is None:
        return False
    if not getattr(decide, "ft_cpu_compact", False):
        def compact_on_cpu(device: torch.device) -> bool:
            return device.type == "cpu" or decide(device)

        compact_on_cpu.ft_cpu_compact = True
        trl_utils._use_triton = compact_on_cpu  # the name TRL's fused LM head reads; its kernels keep theirs
    if not getattr(head, "ft_cpu", False):
        trl_utils._ChunkedLogProbFunction = fused_head_for_cpu(head)
    return True
