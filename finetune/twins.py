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
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from finetune.models import OLMO3, QWEN3_5, REGISTRY, Family

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

TWINS = {
    "tiny-qwen3.5": TwinSpec(
        family=QWEN3_5,
        architecture="Qwen3_5ForCausalLM",
        config=dict(
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
        ),
        tokenizer=TokenizerSpec(
            regex=QWEN35_REGEX,
            nfc=True,
            special=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                     "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
            added=("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
                   "</tool_response>"),
        ),
    ),
    "tiny-olmo3": TwinSpec(
        family=OLMO3,
        architecture="Olmo3ForCausalLM",
        config=dict(
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
        ),
        tokenizer=TokenizerSpec(
            regex=DOLMA2_REGEX,
            nfc=False,
            special=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"),
            added=(),
        ),
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("FT_CACHE", Path.home() / ".cache" / "ft"))


def twin_dir(alias: str) -> Path:
    import transformers

    spec = TWINS[alias]
    key = json.dumps([TWIN_FORMAT, transformers.__version__, spec.architecture, spec.config,
                      asdict(spec.tokenizer), asdict(spec.family), spec.family.read_template()],
                     sort_keys=True)
    return cache_root() / "twins" / f"{alias}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def ensure_twin(alias: str) -> Path:
    """The twin's folder, built on first use. Built in a temporary folder and renamed into place,
    so a build killed half-way is never mistaken for a finished twin."""
    if alias not in TWINS:
        raise KeyError(f"{alias} is not a twin; twins: {sorted(TWINS)}")
    assert REGISTRY[alias].is_twin
    final = twin_dir(alias)
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build_twin(TWINS[alias], tmp)
        try:
            tmp.rename(final)
        except OSError:  # another process finished first: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


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
    config = model_class.config_class(
        vocab_size=vocab_size,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **spec.config,
    )
    model = random_model(model_class, config, seed=0)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t)
                                            for t in spec.family.end_of_turn]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "TWIN.md").write_text(
        f"Tiny twin of the {spec.family.name} family, built by ft (format {TWIN_FORMAT}).\n"
        "Random weights: it exists to exercise real code paths, not to be useful.\n",
        encoding="utf-8",
    )


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
