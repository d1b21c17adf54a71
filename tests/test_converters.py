"""The qwen3 and llama converters, on tiny random checkpoints built here (no chat family is
registered for these architectures, so this checks the conversion itself): a LoRA adapter with
non-zero weights is merged by ft's streaming path and the GGUF's logits are compared with peft's
merge_and_unload() in transformers."""

from __future__ import annotations

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


def test_converter_matches_transformers(checkpoint, tmp_path):
    arch, folder, tokenizer, merged, pre, eos = checkpoint
    out = tmp_path / f"{arch}-f16.gguf"
    convert(arch, folder, tokenizer, pre, eos, out)
    sequences = [tokenizer.encode(t, add_special_tokens=False) for t in verify.CORPUS[:6]]
    reference = verify.reference_logits(merged, sequences)
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
        logits = verify.logit_parity(verify.reference_logits(merged, sequences), gguf, sequences)
    assert logits["top1_agreement"] < 0.9 or logits["kl_mean"] > 1e-2
