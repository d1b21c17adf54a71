"""Every published size: the registry's facts, what transformers builds from them, the estimates.

The facts come from the published config.json files (cited in finetune/models.py); they cannot be
downloaded here, so the tests check what can be checked offline: that every size has its
post-trained and base alias, that the shapes build into transformers models with the widths the
facts imply (gated attention, Gated DeltaNet projections, tied or separate lm_head), that the
meta-device count matches a real model's, and that README's table is what ft computes."""

from __future__ import annotations

import pytest

from finetune.loading import meta_model
from finetune.models import OLMO3, QWEN3_5, QWEN3_5_SHAPES, REGISTRY
from finetune.sizes import published, sizes_markdown, text_config
from tests.conftest import ROOT, run_ft


def test_every_qwen3_5_size_has_a_post_trained_and_a_base_alias():
    for size, shape in QWEN3_5_SHAPES.items():
        post, base = REGISTRY[f"qwen3.5-{size.lower()}"], REGISTRY[f"qwen3.5-{size.lower()}-base"]
        assert post.hub_id == f"Qwen/Qwen3.5-{size}" and base.hub_id == f"Qwen/Qwen3.5-{size}-Base"
        assert post.shape is base.shape is shape and post.family is base.family is QWEN3_5
        assert f"/Qwen/Qwen3.5-{size}/" in shape.config
    assert REGISTRY["olmo3-32b-base"].family is OLMO3 and "Olmo-3-1125-32B" in REGISTRY["olmo3-32b-base"].shape.config
    hub = [m for m in REGISTRY.values() if m.hub_id and not m.packaged]
    assert all(m.shape is not None for m in hub), [m.alias for m in hub if m.shape is None]


@pytest.mark.parametrize("model", published(), ids=lambda m: m.alias)
def test_published_shapes_build_the_widths_they_imply(model):
    s = model.shape
    built = meta_model(text_config(model))
    layers = built.model.layers
    assert len(layers) == s.layers and built.model.embed_tokens.weight.shape == (s.vocab, s.hidden)
    assert (built.lm_head.weight is built.model.embed_tokens.weight) is s.tied_embeddings
    full = next(layer.self_attn for layer in layers if hasattr(layer, "self_attn"))
    gate = 2 if model.family is QWEN3_5 else 1  # Qwen3.5's gated attention: q_proj carries the gate too
    assert full.q_proj.weight.shape == (gate * s.heads * s.head_dim, s.hidden)
    assert full.k_proj.weight.shape == (s.kv_heads * s.head_dim, s.hidden)
    assert layers[0].mlp.gate_proj.weight.shape == (s.intermediate, s.hidden)
    if model.family is QWEN3_5:
        linear = layers[0].linear_attn  # 3 of every 4 layers
        assert linear.in_proj_qkv.weight.shape == ((2 * s.linear_key_heads + s.linear_value_heads) * 128, s.hidden)
        assert linear.in_proj_a.weight.shape == (s.linear_value_heads, s.hidden)
        assert sum(hasattr(layer, "linear_attn") for layer in layers) == 3 * s.layers // 4


def test_the_meta_count_is_the_real_count_for_tied_embeddings():
    """accelerate's init_empty_weights leaves a tied lm_head untied under transformers 5.24 (the
    0.8B's embedding would count twice); meta_model must count what a real model holds."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    small = REGISTRY["qwen3.5-0.8b"]
    tiny = replace(small, shape=replace(small.shape, layers=4, hidden=64, intermediate=128, vocab=512, head_dim=32,
                                        heads=2, kv_heads=1))
    config = text_config(tiny)
    real = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in meta_model(config).parameters()) == sum(p.numel() for p in real.parameters())


def test_a_tied_checkpoint_loads_tied(tmp_path):
    """tiny-qwen3.5-tied-hub is saved as the 0.8B, 2B and 4B are (no lm_head tensor): loaded as
    training loads it, the output layer is the embedding, not a fresh random matrix."""
    from finetune.loading import load_base_model, prepare
    from finetune.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "tiny-support.yaml",
                         ["model.base=tiny-qwen3.5-tied-hub", "quantization.load_in_4bit=false"])
    model = load_base_model(recipe, prepare(recipe).base)
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_readme_size_table_is_what_ft_computes():
    """On failure, paste `python -c "from finetune.sizes import sizes_markdown; print(sizes_markdown())"`
    between the sizes markers."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("<!-- sizes:start -->")[1].split("<!-- sizes:end -->")[0]
    assert table.strip() == sizes_markdown()


def test_ft_models_lists_every_size():
    result = run_ft("models", "--sizes")
    assert result.returncode == 0, result.stderr
    for model in published():
        assert model.alias in result.stdout
    assert "12.9 GiB" in result.stdout  # the 9B at support.yaml's settings on a GPU, as README says


def test_preflight_counts_what_trl_and_the_backend_really_hold(monkeypatch):
    """qwen3.5-9b at support.yaml's settings on a GPU. TRL 1.15 (unsloth's pin, the GPU image's)
    always runs its tiled LM head on CUDA: no full [tokens, vocabulary] logits there, the full
    ones on a CPU; with TRL 1.16 a CPU scores through ft's head in row tiles. TRL casts a quantized model's adapters to bf16 (8 bytes a parameter with AdamW,
    16 in fp32 on a CPU); the embeddings stay bf16 on a GPU (ft skips peft's fp32 upcast there, as
    unsloth does)."""
    from finetune import preflight
    from finetune.loading import lora_targets
    from finetune.preflight import count_parameters, memory_estimate
    from finetune.recipe import load_recipe
    from finetune.sizes import GPU_RECIPE
    from finetune import lm_head

    model = REGISTRY["qwen3.5-9b"]
    recipe = load_recipe(GPU_RECIPE, ["model.base=qwen3.5-9b"])
    config = text_config(model)
    params, embed, lora = count_parameters(meta_model(config), lora_targets(recipe, model.family), recipe.lora.r)
    tokens = recipe.train.batch_size * recipe.data.max_length
    for trl in ("1.15.0", "1.16.0"):
        monkeypatch.setattr(preflight, "trl_version", lambda: trl)
        gpu = memory_estimate(recipe, config, params, embed, lora, gpu=True, checkpointing=True)
        assert gpu.logits == min(tokens, 4096) * min(config.vocab_size, 32768) * 8, trl
        cpu = memory_estimate(recipe, config, params, embed, lora, gpu=False, checkpointing=True)
        full = tokens * config.vocab_size * 8
        # TRL 1.16 on a CPU: ft's head (finetune/lm_head.py), a row tile and two temporaries, kept bf16 probabilities
        ft_head = min(tokens * config.vocab_size * 4, lm_head.ROW_TILE_BYTES) * 3 + min(
            tokens * config.vocab_size * 2, lm_head.KEPT_PROBS_BYTES)
        assert cpu.logits == (full if trl == "1.15.0" else ft_head)
        assert gpu.adapters == lora * 8 and cpu.adapters == lora * 16
    gpu = memory_estimate(recipe, config, params, embed, lora, gpu=True, checkpointing=True)
    cpu = memory_estimate(recipe, config, params, embed, lora, gpu=False, checkpointing=True)
    assert cpu.weights - gpu.weights == embed * 2  # embeddings bf16 on a GPU (no fp32 upcast), fp32 on a CPU
