"""The qwen3 and llama converters, on tiny random checkpoints built here (no chat family is
registered for these architectures, so this checks the conversion itself): a LoRA adapter with
non-zero weights is merged by ft's streaming path and the GGUF's logits are compared with peft's
merge_and_unload() in transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export import arches, verify
from export.arches import arch_for
from export.checkpoint import Checkpoint, read_config
from export.gguf_file import write_gguf
from export.llama import GGUFModel
from export.merge import Adapter
from export.quantize import quantize
from export.vocab import add_vocab
from finetune.twins import DOLMA2_REGEX, TokenizerSpec, build_tokenizer, random_model

pytestmark = pytest.mark.slow

QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

CASES = {
    # arch: (transformers class, config, pre-tokenizer, regex, NFC, specials, eos, bos)
    "qwen3": ("Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
              "qwen2", QWEN2_REGEX, True, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "<|im_end|>", None),
    "llama": ("LlamaForCausalLM", dict(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False),
              "llama-bpe", DOLMA2_REGEX, False, ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"),
              "<|eot_id|>", "<|begin_of_text|>"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    import transformers
    from peft import LoraConfig, get_peft_model

    arch = request.param
    cls_name, extra, pre, regex, nfc, specials, eos, bos = CASES[arch]
    folder = tmp_path_factory.mktemp(arch) / "base"
    tokenizer = build_tokenizer(TokenizerSpec(regex, nfc, specials, ()), eos, specials[1] if arch == "llama" else
                                "<|endoftext|>", bos, "{{ messages }}")
    cls = getattr(transformers, cls_name)
    config = cls.config_class(vocab_size=-(-len(tokenizer) // 256) * 256, hidden_size=256, intermediate_size=512,
                              num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                              rms_norm_eps=1e-6, **extra)
    random_model(cls, config, seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    base = cls.from_pretrained(folder, dtype=torch.float32)
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    lora.save_pretrained(folder.parent / "adapter")
    merged = lora.merge_and_unload().eval()
    return arch, folder, tokenizer, merged, pre, eos


def convert(arch, folder, tokenizer, pre, eos, out):
    cfg = read_config(folder)
    write_gguf(out, arch_for(arch), cfg, Checkpoint.open(folder), Adapter(folder.parent / "adapter"), "f16",
               lambda w: add_vocab(w, tokenizer, folder, pre, eos, cfg["vocab_size"], "{{ messages }}"),
               {"name": arch, "license": "test"})


def streamed_reference(folder, sequences, tmp_path):
    from export.reference import reference_logits

    return reference_logits(folder, folder.parent / "adapter", sequences, tmp_path / "reference.npy")


def test_converter_matches_transformers(checkpoint, tmp_path):
    arch, folder, tokenizer, merged, pre, eos = checkpoint
    out = tmp_path / f"{arch}-f16.gguf"
    convert(arch, folder, tokenizer, pre, eos, out)
    sequences = [tokenizer.encode(t, add_special_tokens=False) for t in verify.CORPUS[:6]]
    reference = streamed_reference(folder, sequences, tmp_path)
    with torch.no_grad():  # the streamed reference is peft's merged model, computed layer by layer
        merged_logits = torch.cat([merged(torch.tensor([s])).logits[0] for s in sequences])
    torch.testing.assert_close(torch.from_numpy(np.asarray(reference)), merged_logits, rtol=1e-4, atol=1e-4)
    with GGUFModel(out, n_ctx=256) as gguf:
        parity = verify.tokenizer_parity(tokenizer, gguf, [], [])
        assert parity["mismatches"] == [], parity
        logits = verify.logit_parity(reference, gguf, sequences)
    assert logits["top1_agreement"] >= 0.99 and logits["kl_mean"] < 1e-3, logits
    quantized = tmp_path / f"{arch}-q4_k_m.gguf"
    quantize(out, quantized, "q4_k_m")
    with GGUFModel(quantized, n_ctx=64) as gguf:
        assert torch.isfinite(torch.from_numpy(gguf.logits(sequences[0]))).all()


def test_llama_without_the_rope_permutation_is_caught(checkpoint, tmp_path, monkeypatch):
    arch, folder, tokenizer, merged, pre, eos = checkpoint
    if arch != "llama":
        pytest.skip("the permutation is llama's")
    monkeypatch.setattr(arches.Llama, "transform", lambda self, name, cfg: (name, None))
    out = tmp_path / "broken.gguf"
    convert(arch, folder, tokenizer, pre, eos, out)
    sequences = [tokenizer.encode(t, add_special_tokens=False) for t in verify.CORPUS[:6]]
    with GGUFModel(out, n_ctx=256) as gguf:
        logits = verify.logit_parity(streamed_reference(folder, sequences, tmp_path), gguf, sequences)
    assert logits["top1_agreement"] < 0.9 or logits["kl_mean"] > 1e-2


# --- config robustness: every spelling of the rope settings, and what cannot be converted -------

def written(arch_name: str, cfg: dict) -> dict:
    """The metadata ft's converter writes for this config, as {key: value}."""
    import gguf

    arch = arch_for(arch_name)
    arch.check(cfg)
    writer = gguf.GGUFWriter(path=None, arch=arch_name)
    arch.metadata(writer, cfg)
    return {k: v.value for k, v in writer.kv_data[0].items()}


def qwen35_cfg(**changes) -> dict:
    from finetune.twins import TWINS

    cfg = {**TWINS["tiny-qwen3.5"].config, "vocab_size": 768}
    cfg.update(changes)
    return {k: v for k, v in cfg.items() if v is not None}


def olmo3_cfg(**changes) -> dict:
    from finetune.twins import TWINS

    cfg = {**TWINS["tiny-olmo3"].config, "vocab_size": 768}
    cfg.update(changes)
    return {k: v for k, v in cfg.items() if v is not None}


YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "attention_factor": 1.2079,
        "beta_fast": 32.0, "beta_slow": 1.0}


def test_legacy_rope_scaling_type_is_read():
    legacy = {k: v for k, v in YARN.items() if k != "rope_type"} | {"type": "yarn"}
    for scaling in (YARN, legacy):
        keys = written("olmo2", olmo3_cfg(rope_scaling=scaling))
        assert keys["olmo2.rope.scaling.type"] == "yarn"
        assert keys["olmo2.rope.scaling.factor"] == pytest.approx(8.0)
        assert keys["olmo2.rope.scaling.original_context_length"] == 64
        assert keys["olmo2.rope.scaling.yarn_attn_factor"] == pytest.approx(1.2079)


def test_yarn_defaults_follow_transformers():
    """Missing betas: transformers' 32 / 1 (llama.cpp's converter crashes on a missing beta_slow);
    missing factor: max_position_embeddings / original context, as transformers derives it
    (llama.cpp's converter silently drops YaRN)."""
    no_betas = {k: v for k, v in YARN.items() if not k.startswith("beta")}
    keys = written("olmo2", olmo3_cfg(rope_scaling=no_betas))
    assert keys["olmo2.rope.scaling.yarn_beta_fast"] == 32 and keys["olmo2.rope.scaling.yarn_beta_slow"] == 1
    no_factor = {k: v for k, v in YARN.items() if k != "factor"}
    keys = written("olmo2", olmo3_cfg(rope_scaling=no_factor, max_position_embeddings=512))
    assert keys["olmo2.rope.scaling.factor"] == pytest.approx(512 / 64)


def test_partial_rotary_factor_nested_top_level_or_default():
    nested = qwen35_cfg()
    assert written("qwen35", nested)["qwen35.rope.dimension_count"] == 64 * 0.25
    params = {k: v for k, v in nested["rope_parameters"].items() if k != "partial_rotary_factor"}
    top = qwen35_cfg(rope_parameters=params, partial_rotary_factor=0.5)
    assert written("qwen35", top)["qwen35.rope.dimension_count"] == 32
    absent = qwen35_cfg(rope_parameters=params)  # Qwen3.5's default, as transformers and llama.cpp
    assert written("qwen35", absent)["qwen35.rope.dimension_count"] == 16


@pytest.mark.parametrize("arch_name,cfg,key", [
    ("qwen35", qwen35_cfg(layer_types=["linear_attention"] * 3), "layer_types"),
    ("olmo2", olmo3_cfg(layer_types=["sliding_attention"] * 3 + ["global"]), "layer_types"),
    ("olmo2", olmo3_cfg(rope_scaling={**YARN, "mscale": 0.7, "mscale_all_dim": 0.7}), "mscale"),
    ("olmo2", olmo3_cfg(rope_scaling={"rope_type": "linear"}), "factor"),
    ("olmo2", olmo3_cfg(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_type"),
])
def test_unconvertible_configs_are_refused_naming_the_key(arch_name, cfg, key):
    from finetune.errors import UserError

    with pytest.raises(UserError) as info:
        arch_for(arch_name).check(cfg)
    assert "config.json" in info.value.render() and key in info.value.render()
