"""Tiny twins: small models of the real architectures, built locally and deterministically.

Nothing can be downloaded from a model hub here, and tests must run in seconds on two CPU cores.
A twin is the real transformers class (`Qwen3_5ForCausalLM` with Gated DeltaNet *and* full
attention layers, `Olmo3ForCausalLM` with sliding *and* full layers) at a tiny size, plus a
byte-level BPE tokenizer trained here with the family's pre-tokenizer regex, special tokens and
real chat template. Everything downstream (4-bit loading, LoRA, masks, GGUF export, llama.cpp)
takes exactly the path a 9B checkpoint takes; only the size differs.

Hidden and intermediate sizes are multiples of 256 so K-quants apply to them later, and the
Qwen3.5 twin keeps the 9B's ratio of value to key heads (2:1) so the GGUF head reorder is real.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from finetune.models import OLMO3, QWEN3_5, Family
from finetune.run import cache_root

TWIN_FORMAT = 1  # bump when a twin's recipe changes, so caches rebuild


@dataclass(frozen=True)
class TokenizerSpec:
    regex: str  # the family's pre-tokenizer split pattern (what llama.cpp names by `pre`)
    nfc: bool  # Qwen3.5 normalizes to NFC before splitting; Dolma2 does not
    special: tuple[str, ...]  # control tokens, appended after the learned vocabulary
    added: tuple[str, ...]  # added (non-special) tokens such as <think>
    vocab_size: int = 1536


@dataclass(frozen=True)
class TwinSpec:
    family: Family
    architecture: str
    config: dict = field(default_factory=dict)
    tokenizer: TokenizerSpec | None = None
    # "flat": saved as the architecture class saves itself. "qwen3_5_hub": as Qwen/Qwen3.5-9B is
    # published (vision-language class, text_config, a vision tower, mtp.* tensors). "rope_scaling":
    # rope settings written in the legacy `rope_theta` + `rope_scaling` form, as OLMo 3 7B is.
    layout: str = "flat"
    vision_config: dict = field(default_factory=dict)


# transformers' Qwen3_5Tokenizer pattern: Qwen2's with combining marks (\p{M}) kept in words.
QWEN35_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Dolma2 (OLMo 2/3) pattern, cl100k-style; llama.cpp calls it `dbrx`.
DOLMA2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

QWEN35_TOKENIZER = TokenizerSpec(
    regex=QWEN35_REGEX,
    nfc=True,
    special=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
             "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
    added=("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
           "</tool_response>"),
)
OLMO3_TOKENIZER = TokenizerSpec(
    regex=DOLMA2_REGEX,
    nfc=False,
    special=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"),
    added=(),
)

QWEN35_TEXT = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,  # layer_types default: 3 linear_attention + 1 full_attention
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=64,
    linear_value_head_dim=64,
    linear_conv_kernel_dim=4,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    # as in the 9B: a quarter of each head is rotated, in interleaved mrope sections
    rope_parameters=dict(
        rope_type="default", rope_theta=10_000_000.0, partial_rotary_factor=0.25,
        mrope_section=[3, 3, 2], mrope_interleaved=True,
    ),
)
OLMO3_CONFIG = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_theta=500_000.0,
    tie_word_embeddings=False,
    # a window shorter than a typical example, so the sliding layers really slide
    sliding_window=64,
    layer_types=["sliding_attention"] * 3 + ["full_attention"],
)

TWINS = {
    "tiny-qwen3.5": TwinSpec(family=QWEN3_5, architecture="Qwen3_5ForCausalLM", config=QWEN35_TEXT,
                             tokenizer=QWEN35_TOKENIZER),
    "tiny-olmo3": TwinSpec(family=OLMO3, architecture="Olmo3ForCausalLM", config=OLMO3_CONFIG,
                           tokenizer=OLMO3_TOKENIZER),
    # Qwen/Qwen3.5-9B as published: Qwen3_5ForConditionalGeneration, the text model nested under
    # text_config and model.language_model.*, a vision tower, an MTP head (mtp.*) that
    # transformers does not load, more embedding rows than the tokenizer has.
    "tiny-qwen3.5-hub": TwinSpec(
        family=QWEN3_5, architecture="Qwen3_5ForConditionalGeneration",
        config={**QWEN35_TEXT, "mtp_num_hidden_layers": 1}, tokenizer=QWEN35_TOKENIZER, layout="qwen3_5_hub",
        vision_config=dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=256,
                           patch_size=8, num_position_embeddings=64)),
    # Qwen/Qwen3.5-0.8B, 2B and 4B as published: the same hub layout with tied embeddings (no
    # lm_head tensor in the checkpoint; the GGUF carries no output.weight and llama.cpp reads
    # token_embd for both ends).
    "tiny-qwen3.5-tied-hub": TwinSpec(
        family=QWEN3_5, architecture="Qwen3_5ForConditionalGeneration",
        config={**QWEN35_TEXT, "mtp_num_hidden_layers": 1, "tie_word_embeddings": True}, tokenizer=QWEN35_TOKENIZER,
        layout="qwen3_5_hub",
        vision_config=dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=256,
                           patch_size=8, num_position_embeddings=64)),
    # allenai/Olmo-3-7B-Instruct's config: YaRN as legacy `rope_scaling` (factor 8, attention factor
    # 1.2079, betas 32/1) over rope_theta 500,000, scaled to the twin: an original context of 64
    # (the 7B's 8,192) and 512 positions (its 65,536), sliding window 64 on 3 of every 4 layers.
    # Held-out examples (~180 tokens) exceed both the window and the original context.
    "tiny-olmo3-yarn": TwinSpec(
        family=OLMO3, architecture="Olmo3ForCausalLM",
        config={**OLMO3_CONFIG, "max_position_embeddings": 512,
                "rope_scaling": dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=64,
                                     attention_factor=1.2079441541679836, beta_fast=32.0, beta_slow=1.0)},
        tokenizer=OLMO3_TOKENIZER, layout="rope_scaling"),
}


def twin_dir(alias: str) -> Path:
    import transformers

    spec = TWINS[alias]
    parts = [TWIN_FORMAT, transformers.__version__, spec.architecture, spec.config,
             asdict(spec.tokenizer), asdict(spec.family), spec.family.read_template()]
    if spec.layout != "flat":
        parts += [spec.layout, spec.vision_config]
    key = json.dumps(parts, sort_keys=True)
    return cache_root() / "twins" / f"{alias}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def ensure_twin(alias: str) -> Path:
    """The twin's folder, built on first use. Built in a temporary folder and renamed into place,
    so a build killed half-way is never mistaken for a finished twin."""
    if alias not in TWINS:
        raise KeyError(f"{alias} is not a twin; twins: {sorted(TWINS)}")
    final = twin_dir(alias)
    if not (final / "config.json").is_file():
        build_in_place(final, lambda folder: build_twin(TWINS[alias], folder))
    return final


def build_in_place(final: Path, build) -> None:
    """Run `build(folder)` in a temporary folder beside `final` and rename it into place: a build
    killed half-way is never mistaken for a finished one (twins, packaged bases)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another process finished first: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_tokenizer(spec: TokenizerSpec, eos: str, pad: str, bos: str | None, chat_template: str):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if spec.nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(spec.regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    corpus = resources.files("finetune").joinpath("twin_corpus.txt").read_text(encoding="utf-8")
    tok.train_from_iterator(corpus.splitlines(keepends=True), trainer)
    # Real checkpoints keep control tokens after the learned vocabulary; so does the twin.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.added])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        pad_token=pad,
        bos_token=bos,
        chat_template=chat_template,
        model_max_length=4096,
    )


def build_twin(spec: TwinSpec, out: Path) -> None:
    import transformers

    family = spec.family
    tokenizer = build_tokenizer(spec.tokenizer, family.eos_token, family.pad_token, family.bos_token,
                                family.read_template())
    # Like real checkpoints, the embedding has padding rows past the tokenizer's last id.
    vocab_size = -(-len(tokenizer) // 256) * 256
    model_class = getattr(transformers, spec.architecture)
    text = dict(vocab_size=vocab_size, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, **spec.config)
    if spec.layout == "qwen3_5_hub":
        config = model_class.config_class(text_config=text, vision_config=spec.vision_config,
                                          tie_word_embeddings=spec.config.get("tie_word_embeddings", False))
    else:
        config = model_class.config_class(**text)
    model = random_model(model_class, config, seed=0)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t)
                                            for t in spec.family.end_of_turn]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if spec.layout == "qwen3_5_hub":
        add_mtp_head(out, spec.config)
    elif spec.layout == "rope_scaling":
        legacy_rope_config(out, spec.config)
    (out / "TWIN.md").write_text(
        f"Tiny twin of the {spec.family.name} family, built by ft (format {TWIN_FORMAT}).\n"
        "Random weights: it exists to exercise real code paths, not to be useful.\n",
        encoding="utf-8",
    )


def mtp_head_tensors(text: dict) -> dict:
    """The hub checkpoint's multi-token-prediction head: tensors transformers ignores on load
    and a text GGUF leaves out. Names and shapes as in Qwen3.5-9B, at the config's size."""
    import torch

    h, ff = text["hidden_size"], text["intermediate_size"]
    q = text["num_attention_heads"] * text["head_dim"]
    kv = text["num_key_value_heads"] * text["head_dim"]
    shapes = {"mtp.fc.weight": (h, 2 * h), "mtp.norm.weight": (h,), "mtp.pre_fc_norm_embedding.weight": (h,),
              "mtp.pre_fc_norm_hidden.weight": (h,), "mtp.layers.0.input_layernorm.weight": (h,),
              "mtp.layers.0.post_attention_layernorm.weight": (h,),
              "mtp.layers.0.self_attn.q_proj.weight": (2 * q, h), "mtp.layers.0.self_attn.k_proj.weight": (kv, h),
              "mtp.layers.0.self_attn.v_proj.weight": (kv, h), "mtp.layers.0.self_attn.o_proj.weight": (h, q),
              "mtp.layers.0.mlp.gate_proj.weight": (ff, h), "mtp.layers.0.mlp.up_proj.weight": (ff, h),
              "mtp.layers.0.mlp.down_proj.weight": (h, ff)}
    generator = torch.Generator().manual_seed(1)
    return {k: (torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}


def add_mtp_head(folder: Path, text: dict) -> None:
    """The MTP head added to the twin's single safetensors file."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    save_file({**load_file(str(path)), **mtp_head_tensors(text)}, str(path), metadata={"format": "pt"})


def legacy_rope_config(folder: Path, config: dict) -> None:
    """Write the rope settings as OLMo 3's hub config.json does (`rope_theta` + `rope_scaling`),
    not in the `rope_parameters` form transformers 5 saves."""
    path = folder / "config.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    saved.pop("rope_parameters", None)
    saved.update(rope_theta=config["rope_theta"], rope_scaling=config["rope_scaling"])
    path.write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")


def random_model(model_class, config, seed: int):
    """A seeded random model in bf16 (the dtype real checkpoints ship in). transformers
    initialises norms to constants (ones, or zeros for Qwen3.5's 1+w norms), which would hide a
    converter that forgets a norm transform: every 1-D parameter gets a seeded spread instead."""
    import torch

    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model.to(torch.bfloat16)
