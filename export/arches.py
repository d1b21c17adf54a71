"""HF → GGUF, per llama.cpp architecture: metadata keys and per-tensor transforms.

Names come from gguf-py (`get_tensor_name_map`, `Keys` through the writer's add_* methods): the
one source of truth llama.cpp itself uses. What gguf-py does not know is how each architecture's
HF weights differ numerically from what llama.cpp computes with; those transforms are written
here from llama.cpp's own converter and C++ (conversion/qwen.py, src/models/*.cpp, llama.cpp as vendored by llama-cpp-python 0.3.36),
each checked against transformers (tests/test_export.py, tests/test_converters.py):

  qwen35  Qwen3.5: norms stored as w (HF computes x̂·(1+w)) → +1; A_log → −exp(A_log);
          dt_bias → ssm_dt.bias; conv1d squeezed; value heads reordered grouped → tiled when
          key and value head counts differ (HF repeat_interleaves keys, ggml tiles them).
  olmo2   OLMo 2 / OLMo 3 (sliding-window pattern as metadata): no transforms.
  qwen3   no transforms.
  llama   q/k rows permuted: llama.cpp rotates adjacent pairs, HF rotates halves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import gguf
import torch

from finetune.errors import UserError

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class TensorPlan:
    gguf_name: str
    source: str  # name in the checkpoint
    weight_name: str  # normalized HF name (what LoRA deltas are keyed by)
    transform: Transform | None  # whole-tensor transform applied after the merge
    force_f32: bool


def rope_theta(cfg: dict, layer_type: str = "full_attention") -> float | None:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    return params.get("rope_theta", cfg.get("rope_theta"))


def rope_params(cfg: dict) -> dict:
    """The full-attention layers' rope settings, whichever way the config spells them: legacy
    `rope_theta` + `rope_scaling` (with `type` or `rope_type`) or transformers 5 `rope_parameters`,
    flat or nested per layer type."""
    params = cfg.get("rope_parameters") or {}
    if isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]
    merged = {**(cfg.get("rope_scaling") or {}), **params}
    if "rope_type" not in merged and "type" in merged:  # the legacy spelling
        merged["rope_type"] = merged["type"]
    return merged


@dataclass
class Rope:
    """Rope settings as transformers computes them (defaults included), for llama.cpp's keys."""

    theta: float | None
    kind: str  # default | linear | yarn
    partial_rotary_factor: float
    factor: float | None = None
    original_context: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None


def rope_settings(cfg: dict, default_partial: float = 1.0) -> Rope:
    """Resolve the rope configuration with transformers' defaults (modeling_rope_utils), and
    refuse, naming the key, what llama.cpp cannot reproduce. llama.cpp's own converter silently
    drops YaRN without `factor` and crashes without `beta_slow`; here a missing factor is derived
    as transformers derives it and missing betas take transformers' (and llama.cpp's) 32 / 1."""
    params = rope_params(cfg)
    kind = params.get("rope_type") or "default"
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", default_partial))
    rope = Rope(rope_theta(cfg), kind, float(partial))
    key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    if kind == "linear":
        if params.get("factor") is None:
            raise UserError("linear rope scaling without a factor", f"config.json {key}.factor",
                            "add the factor the model was trained with")
        rope.factor = float(params["factor"])
    elif kind == "yarn":
        for unsupported in ("mscale", "mscale_all_dim"):
            if params.get(unsupported) is not None:
                raise UserError(f"YaRN with '{unsupported}' has no llama.cpp equivalent", f"config.json {key}.{unsupported}",
                                "export this model with llama.cpp's own converter and check it by hand")
        if params.get("truncate") is False:
            raise UserError("YaRN with truncate: false has no llama.cpp equivalent", f"config.json {key}.truncate",
                            "export this model with llama.cpp's own converter and check it by hand")
        original = (params.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
                    or cfg["max_position_embeddings"])
        rope.original_context = int(original)
        rope.factor = float(params.get("factor") or cfg["max_position_embeddings"] / original)
        rope.attention_factor = params.get("attention_factor")
        rope.beta_fast = float(params.get("beta_fast") or 32)
        rope.beta_slow = float(params.get("beta_slow") or 1)
    elif kind != "default":
        raise UserError(f"rope type '{kind}' is not supported by ft's converter", f"config.json {key}.rope_type",
                        "export this model with llama.cpp's own converter")
    return rope


def check_layer_types(cfg: dict, allowed: tuple[str, ...]) -> None:
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        return
    if len(layer_types) != cfg["num_hidden_layers"]:
        raise UserError(f"layer_types lists {len(layer_types)} layers but num_hidden_layers is "
                        f"{cfg['num_hidden_layers']}", "config.json layer_types",
                        "fix the checkpoint's config.json: one entry per layer")
    unknown = sorted(set(layer_types) - set(allowed))
    if unknown:
        raise UserError(f"layer_types has values this architecture does not have: {', '.join(unknown)}",
                        "config.json layer_types", f"use {' / '.join(allowed)}")


class Arch:
    """Generic decoder: the keys every llama.cpp text architecture reads."""

    name: str
    model_arch: gguf.MODEL_ARCH
    tied_output_allowed = True
    default_partial_rotary = 1.0
    layer_types: tuple[str, ...] = ("full_attention",)

    def check(self, cfg: dict) -> None:
        """Everything in the config that the conversion depends on, refused before any work."""
        check_layer_types(cfg, self.layer_types)
        rope_settings(cfg, self.default_partial_rotary)

    def metadata(self, w: gguf.GGUFWriter, cfg: dict) -> None:
        w.add_context_length(cfg["max_position_embeddings"])
        w.add_embedding_length(cfg["hidden_size"])
        w.add_block_count(cfg["num_hidden_layers"])
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_head_count(cfg["num_attention_heads"])
        w.add_head_count_kv(cfg.get("num_key_value_heads", cfg["num_attention_heads"]))
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        if cfg.get("head_dim"):
            w.add_key_length(cfg["head_dim"])
            w.add_value_length(cfg["head_dim"])
        rope = rope_settings(cfg, self.default_partial_rotary)
        if rope.theta is not None:
            w.add_rope_freq_base(float(rope.theta))
        if rope.kind == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(rope.factor)
            w.add_rope_scaling_orig_ctx_len(rope.original_context)
            if rope.attention_factor is not None:
                w.add_rope_scaling_yarn_attn_factor(float(rope.attention_factor))
            w.add_rope_scaling_yarn_beta_fast(rope.beta_fast)
            w.add_rope_scaling_yarn_beta_slow(rope.beta_slow)
        elif rope.kind == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope.factor)

    def transform(self, name: str, cfg: dict) -> tuple[str, Transform | None]:
        """(name to look up in gguf-py's map, transform). Default: unchanged."""
        return name, None

    def plan(self, names: dict[str, str], shapes: Callable[[str], tuple], cfg: dict) -> list[TensorPlan]:
        name_map = gguf.get_tensor_name_map(self.model_arch, cfg["num_hidden_layers"])
        plans, unknown = [], []
        for norm_name, source in names.items():
            lookup, fn = self.transform(norm_name, cfg)
            gguf_name = name_map.get_name(lookup, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                unknown.append(norm_name)
                continue
            ndim = len(shapes(source)) - (1 if "conv1d" in norm_name else 0)
            f32 = (ndim <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight")
                   or ".ssm_conv1d." in gguf_name)
            plans.append(TensorPlan(gguf_name, source, norm_name, fn, f32))
        if unknown:
            raise UserError(f"{len(unknown)} tensors have no {self.name} GGUF name, e.g. {unknown[:3]}",
                            "base checkpoint", "this checkpoint's layout is not the one ft's converter knows")
        if not self.tied_output_allowed and not any(p.gguf_name == "output.weight" for p in plans):
            raise UserError(f"{self.name} needs a separate lm_head (llama.cpp has no tied fallback for it)",
                            "base checkpoint", "export a checkpoint with tie_word_embeddings false")
        return plans


def reorder_value_heads(t: torch.Tensor, axis: int, n_k: int, n_v: int, head_dim: int) -> torch.Tensor:
    """Value heads grouped by key head (HF: v-head h uses k-head h // r) → tiled (ggml: v-head
    h' uses k-head h' % n_k): view the axis as [n_k, r, head_dim], swap the first two."""
    r = n_v // n_k
    moved = t.movedim(axis, 0)
    shape = moved.shape
    moved = moved.reshape(n_k, r, head_dim, *shape[1:]).transpose(0, 1).reshape(shape)
    return moved.movedim(0, axis)


class Qwen35(Arch):
    name = "qwen35"
    model_arch = gguf.MODEL_ARCH.QWEN35
    default_partial_rotary = 0.25  # Qwen3_5TextConfig's default, and llama.cpp's converter's
    layer_types = ("linear_attention", "full_attention")

    def check(self, cfg: dict) -> None:
        super().check(cfg)
        if cfg["linear_key_head_dim"] != cfg["linear_value_head_dim"]:
            raise UserError("llama.cpp's qwen35 needs linear_key_head_dim == linear_value_head_dim",
                            "config.json", "this Qwen3.5 variant cannot run in llama.cpp")
        if cfg["linear_num_value_heads"] % cfg["linear_num_key_heads"]:
            raise UserError("linear_num_value_heads must be a multiple of linear_num_key_heads", "config.json",
                            "this Qwen3.5 variant cannot run in llama.cpp")

    def metadata(self, w: gguf.GGUFWriter, cfg: dict) -> None:
        super().metadata(w, cfg)
        rope = rope_params(cfg)
        partial = rope_settings(cfg, self.default_partial_rotary).partial_rotary_factor
        w.add_rope_dimension_count(int(cfg["head_dim"] * partial))
        sections = list(rope.get("mrope_section") or cfg.get("mrope_section") or [11, 11, 10])
        w.add_rope_dimension_sections((sections + [0, 0, 0, 0])[:4])
        w.add_ssm_conv_kernel(cfg["linear_conv_kernel_dim"])
        w.add_ssm_state_size(cfg["linear_key_head_dim"])
        w.add_ssm_group_count(cfg["linear_num_key_heads"])
        w.add_ssm_time_step_rank(cfg["linear_num_value_heads"])
        w.add_ssm_inner_size(cfg["linear_value_head_dim"] * cfg["linear_num_value_heads"])
        interval = cfg.get("full_attention_interval", 4)
        w.add_full_attention_interval(interval)
        layer_types = cfg.get("layer_types") or [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(cfg["num_hidden_layers"])]
        # gguf 0.19.0 has no add_recurrent_layers; llama.cpp reads this key when present
        w.add_array(f"{self.name}.attention.recurrent_layers", [t == "linear_attention" for t in layer_types])

    def transform(self, name: str, cfg: dict) -> tuple[str, Transform | None]:
        n_k, n_v = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
        hd = cfg["linear_value_head_dim"]
        key_dim = n_k * cfg["linear_key_head_dim"]

        def heads(axis: int, head_dim: int, start: int = 0) -> Transform | None:
            if n_k == n_v:
                return None

            def fn(t: torch.Tensor) -> torch.Tensor:
                if start == 0:
                    return reorder_value_heads(t, axis, n_k, n_v, head_dim)
                return torch.cat([t[:start], reorder_value_heads(t[start:], axis, n_k, n_v, head_dim)])
            return fn

        def chain(*fns: Transform | None) -> Transform:
            def fn(t: torch.Tensor) -> torch.Tensor:
                for f in fns:
                    t = f(t) if f else t
                return t
            return fn

        if name.endswith("linear_attn.A_log"):
            return name, chain(lambda t: -torch.exp(t), heads(0, 1))
        if name.endswith("linear_attn.dt_bias"):
            return name.replace("dt_bias", "dt_proj.bias"), heads(0, 1)
        if name.endswith("linear_attn.conv1d.weight"):
            return name, chain(lambda t: t.squeeze(1), heads(0, hd, start=2 * key_dim))
        if name.endswith("linear_attn.in_proj_qkv.weight"):
            return name, heads(0, hd, start=2 * key_dim)
        if name.endswith("linear_attn.in_proj_z.weight"):
            return name, heads(0, hd)
        if name.endswith(("linear_attn.in_proj_a.weight", "linear_attn.in_proj_b.weight")):
            return name, heads(0, 1)
        if name.endswith("linear_attn.out_proj.weight"):
            return name, heads(1, hd)
        if name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
            return name, lambda t: t + 1.0  # zero-centred RMSNorm: HF x̂·(1+w), llama.cpp x̂·w
        return name, None


class Olmo2(Arch):
    name = "olmo2"
    model_arch = gguf.MODEL_ARCH.OLMO2
    tied_output_allowed = False
    layer_types = ("sliding_attention", "full_attention")

    def metadata(self, w: gguf.GGUFWriter, cfg: dict) -> None:
        super().metadata(w, cfg)
        if cfg.get("sliding_window"):  # OLMo 3: sliding layers as a per-layer pattern
            w.add_sliding_window(cfg["sliding_window"])
            layer_types = cfg.get("layer_types") or [
                "sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(cfg["num_hidden_layers"])]
            w.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
            swa_theta = rope_theta(cfg, "sliding_attention")
            if swa_theta is not None and swa_theta != rope_theta(cfg):
                w.add_rope_freq_base_swa(float(swa_theta))


class Qwen3(Arch):
    name = "qwen3"
    model_arch = gguf.MODEL_ARCH.QWEN3


class Llama(Arch):
    name = "llama"
    model_arch = gguf.MODEL_ARCH.LLAMA

    def metadata(self, w: gguf.GGUFWriter, cfg: dict) -> None:
        super().metadata(w, cfg)
        w.add_vocab_size(cfg["vocab_size"])
        w.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])

    def transform(self, name: str, cfg: dict) -> tuple[str, Transform | None]:
        heads = cfg["num_attention_heads"]
        if name.endswith("self_attn.q_proj.weight"):
            return name, lambda t: permute_for_llama_rope(t, heads)
        if name.endswith("self_attn.k_proj.weight"):
            return name, lambda t: permute_for_llama_rope(t, cfg.get("num_key_value_heads", heads))
        return name, None


def permute_for_llama_rope(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head from [first half, second half] to interleaved pairs."""
    rows = t.shape[0]
    return t.reshape(n_heads, 2, rows // n_heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


ARCHES: dict[str, Arch] = {a.name: a for a in (Qwen35(), Olmo2(), Qwen3(), Llama())}


def arch_for(name: str) -> Arch:
    if name not in ARCHES:
        raise UserError(f"ft cannot convert GGUF architecture '{name}'", "ft export",
                        f"supported: {', '.join(sorted(ARCHES))}")
    return ARCHES[name]
