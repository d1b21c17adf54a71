"""A micro-batch's shared prefix computed once: the rows of a chat SFT batch begin with the same
tokens (the recipe's system prompt and the template around it), and a padded batch computes
them once a row. On a CPU, where a step's time is its tokens' matmuls, the laptop recipe's rows
(222 tokens on average) share their first 96: a micro-batch of 4 computed 888 tokens where 603
give the same loss; its epoch of 480 tickets trains in 10.2 minutes, not 13.8 (bench/RESULTS.md 21).

The prefix runs once, as a batch of one row, and every layer keeps what a later position reads
from it: the full-attention layers their keys and values, Qwen3.5's linear-attention layers the
conv's last K-1 inputs and the delta rule's state. The rows' remainders (the suffixes) then run
as the batch, at positions P.., each layer reading the prefix's tensors broadcast over the rows.
Autograd sums the rows' gradients into the one prefix, so the loss and the gradients are the
padded batch's in exact arithmetic (tests/test_shared_prefix.py: fp32 to 1e-5, under bf16
autocast within the batch's own rounding).

Only where nothing crosses the split: padded rows (right padding), the prefix unlabelled up to
and including its last token's next (the loss's first predicted token is in the suffix), no
gradient checkpointing, SDPA attention, a CPU (the linear-attention tensors come from ft's CPU
delta rule and conv). transformers' cache would carry the same tensors, but it updates its
buffers in place (a backward through them fails) and its API moves between versions; the three
hooks here are the functions ft already routes (finetune/train/packing.py) and SDPA's entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Fewer shared tokens save little against the one-row pass's per-layer calls (not measured: the
# ones seen here are a chat template's opening, 3-5 tokens, or a system prompt, 20-100)
MIN_SHARED_TOKENS = 16


@dataclass
class PrefixTensors:
    """What the prefix pass leaves for the suffix pass, in layer order, one list per kind."""

    keys_values: list = field(default_factory=list)  # [1, kv_heads, P, head_dim] pairs
    conv_tails: list = field(default_factory=list)  # [1, P', channels]: the conv's last K-1 inputs
    states: list = field(default_factory=list)  # [1, heads, k_dim, v_dim] delta-rule states
    reading: bool = False  # False while the prefix runs (recording), True while the suffixes do


ACTIVE: PrefixTensors | None = None


def shared_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> int:
    """How many leading tokens every row has in common and may be computed once: all real, none
    labelled, and the token after the last of them unlabelled too (the loss predicts token t+1
    from position t, so the first label must be predicted from a suffix position). 0 if fewer
    than MIN_SHARED_TOKENS or a single row."""
    rows, length = input_ids.shape
    if rows < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(0) & (attention_mask == 1).all(0) & (labels == -100).all(0)
    differs = (~same).nonzero()
    common = int(differs[0]) if len(differs) else length
    shared = common - 1  # the token after the prefix is unlabelled in every row
    shared = min(shared, length - 1)  # every row keeps at least one position
    return shared if shared >= MIN_SHARED_TOKENS else 0


def attention(original):
    """SDPA's entry with the prefix's keys and values: recorded while the prefix runs, put in
    front of the suffixes' (broadcast over the rows) while they run, with a mask that lets every
    suffix position see the whole prefix and the suffix causally."""

    def sdpa(module, query, key, value, attention_mask, *args, **kwargs):
        prefix = ACTIVE
        if prefix is None:
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        if not prefix.reading:
            prefix.keys_values.append((key, value))
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        prefix_key, prefix_value = prefix.keys_values.pop(0)
        rows, shared, suffix = key.shape[0], prefix_key.shape[2], key.shape[2]
        key = torch.cat([prefix_key.expand(rows, -1, -1, -1), key], dim=2)
        value = torch.cat([prefix_value.expand(rows, -1, -1, -1), value], dim=2)
        query_at = torch.arange(shared, shared + suffix, device=key.device)[:, None]
        key_at = torch.arange(shared + suffix, device=key.device)[None, :]
        visible = key_at <= query_at
        window = getattr(module, "sliding_window", None)  # OLMo 3's sliding layers: as transformers masks them
        if window:
            visible &= query_at - key_at < window
        kwargs.pop("is_causal", None)
        # right padding: a real position never sees a pad after it, so the rows need no mask of their own
        return original(module, query, key, value, visible[None, None], *args, is_causal=False, **kwargs)

    sdpa.ft_shared_prefix = True
    return sdpa


def conv_input(hidden_states: torch.Tensor, kernel: int) -> tuple[torch.Tensor, int]:
    """The causal conv's input [batch, channels, length] with the prefix's last K-1 inputs in
    front while the suffixes run (returns how many columns were put in front, to drop from the
    output); recorded while the prefix runs."""
    prefix = ACTIVE
    if prefix is None:
        return hidden_states, 0
    rows_layout = hidden_states.transpose(1, 2)  # [batch, length, channels]: the projection's own layout
    if not prefix.reading:
        prefix.conv_tails.append(rows_layout[:, -(kernel - 1):])
        return hidden_states, 0
    tail = prefix.conv_tails.pop(0)
    joined = torch.cat([tail.expand(rows_layout.shape[0], -1, -1), rows_layout], dim=1)
    return joined.transpose(1, 2), tail.shape[1]


def initial_state(batch: int) -> torch.Tensor | None:
    """The delta rule's state where the prefix left it (suffix pass), else None (a zero state)."""
    prefix = ACTIVE
    if prefix is None or not prefix.reading:
        return None
    state = prefix.states.pop(0)
    return state.expand(batch, -1, -1, -1)


def record_state(state: torch.Tensor) -> None:
    if ACTIVE is not None and not ACTIVE.reading:
        ACTIVE.states.append(state)


def recording() -> bool:
    """Whether the prefix pass is running (the delta rule must hand back its final state)."""
    return ACTIVE is not None and not ACTIVE.reading


class PrefixPass:
    """`with PrefixPass() as prefix:` run the prefix; then `with prefix.suffixes():` run the
    rows' remainders. Nothing is kept after the first block ends."""

    def __init__(self):
        self.tensors = PrefixTensors()

    def __enter__(self) -> PrefixPass:
        global ACTIVE
        ACTIVE = self.tensors
        return self

    def __exit__(self, *exc) -> None:
        global ACTIVE
        ACTIVE = None

    def suffixes(self) -> PrefixPass:
        self.tensors.reading = True
        return self

    def leftover(self) -> int:
        t = self.tensors
        return len(t.keys_values) + len(t.conv_tails) + len(t.states)


def applies(model, packed: bool, checkpointing: bool) -> bool:
    """Whether `model`'s training on this machine may share prefixes: padded rows, no gradient
    checkpointing (its recomputed forward would run outside the passes), a CPU, SDPA attention,
    and layers the hooks cover: full and sliding-window attention, and Qwen3.5's linear
    attention through ft's CPU functions."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    covered = layer_types <= {"full_attention", "sliding_attention", "linear_attention"}
    device = next(model.parameters()).device
    return (not packed and not checkpointing and device.type == "cpu" and covered
            and getattr(model.config, "_attn_implementation", None) == "sdpa"
            and ("linear_attention" not in layer_types or config.model_type.startswith("qwen3_5")))


def split_batch(inputs: dict, shared: int) -> tuple[dict, dict]:
    """(the prefix as a one-row batch, the rows' suffixes as the batch, at positions shared..)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    prefix = dict(input_ids=ids[:1, :shared], attention_mask=mask[:1, :shared])
    suffix = {**inputs, "input_ids": ids[:, shared:], "attention_mask": mask[:, shared:],
              "labels": inputs["labels"][:, shared:]}
    positions = torch.arange(shared, ids.shape[1], device=ids.device)
    suffix["position_ids"] = positions.expand(ids.shape[0], -1)
    return prefix, suffix


def install() -> None:
    """Put the SDPA hook in transformers' attention registry (idempotent; inert with no prefix active)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if not getattr(original, "ft_shared_prefix", False):
        ALL_ATTENTION_FUNCTIONS["sdpa"] = attention(original)
