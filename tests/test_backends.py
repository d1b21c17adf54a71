"""What each backend is handed, what it really loaded, and the sharded-QLoRA settings.

Not exercised here (no CUDA GPU, no unsloth, a single device): a run with the unsloth backend,
an FSDP or DeepSpeed run on two GPUs. What is checked instead: ft's own arguments for unsloth
(against the loader's documented parameters), the refusals, the import order `ft train` keeps,
the facts read off a really loaded model, and what TrainingArguments makes of ft's FSDP settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from finetune import loading
from finetune.train.lora import load_model, prepare_for_training
from finetune.train.trainer import sft_config
from finetune.bases import resolve_base
from finetune.train.backends import (check_loaded, check_unsloth_supports, loaded_facts, unsloth_load_arguments,
                               unsloth_lora_arguments)
from finetune.errors import UserError
from finetune.recipe import load_recipe
from tests.conftest import ROOT, run_ft

RECIPE = ROOT / "recipes" / "tiny-support.yaml"


def test_unsloth_is_handed_the_recipes_base_and_settings():
    recipe = load_recipe(RECIPE, ["model.revision=abc123", "train.seed=7", "lora.rslora=true"])
    family = resolve_base(recipe.model.base).family
    quant = loading.quantization_config(recipe, family, torch.bfloat16)
    args = unsloth_load_arguments(recipe, "org/model", quant, torch.bfloat16, 0, checkpointing=True)
    assert args["model_name"] == "org/model" and args["revision"] == "abc123"
    assert args["use_exact_model_name"] is True  # never unsloth's pre-quantized copy
    assert args["text_only"] is True  # the text decoder of a vision-language checkpoint
    assert args["quantization_config"] is quant and args["load_in_4bit"] and not args["full_finetuning"]
    assert (quant.bnb_4bit_quant_type, quant.bnb_4bit_use_double_quant, quant.bnb_4bit_quant_storage) == \
        ("nf4", True, torch.bfloat16)
    assert quant.llm_int8_skip_modules == list(family.skip_4bit)
    assert args["device_map"] == {"": 0} and args["random_state"] == 7 and args["dtype"] == torch.bfloat16
    lora = unsloth_lora_arguments(recipe, loading.lora_targets(recipe, family), checkpointing=False)
    assert lora["target_modules"] == list(family.lora_targets) and lora["use_rslora"] is True
    assert lora["use_gradient_checkpointing"] is False and lora["r"] == recipe.lora.r


@pytest.mark.parametrize("setting,key", [("quantization.quant_type=fp4", "quantization.quant_type"),
                                         ("quantization.double_quant=false", "quantization.double_quant"),
                                         ("lora.dora=true", "lora.dora")])
def test_unsloth_refuses_what_it_cannot_honour(setting, key):
    recipe = load_recipe(RECIPE, ["train.backend=unsloth", setting])
    with pytest.raises(UserError) as caught:
        check_unsloth_supports(recipe)
    problem = caught.value.problems[0]
    assert problem.where == key and "train.backend: hf" in problem.fix
    check_unsloth_supports(load_recipe(RECIPE, ["train.backend=unsloth"]))  # the defaults are fine


def test_unsloth_refusal_comes_before_anything_loads(tmp_path):
    """On any machine, GPU or not: the recipe problem first, exit 2, nothing written."""
    result = run_ft("train", str(RECIPE), "--set", "train.backend=unsloth", "--set", "lora.dora=true",
                    "--output", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    assert "lora.dora true cannot be honoured by the unsloth backend" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()
    validated = run_ft("validate", str(RECIPE), "--set", "train.backend=unsloth", "--set", "quantization.quant_type=fp4")
    assert validated.returncode == 2 and "quantization.quant_type" in validated.stderr


SPY = """
import json, sys
import finetune.train.backends as backends
seen = {}
real = backends.pick_backend
def spy(recipe):
    seen['loaded_before'] = sorted(m for m in ('transformers', 'trl', 'peft', 'datasets') if m in sys.modules)
    return real(recipe)
backends.pick_backend = spy
from finetune.cli import main
sys.argv = ['ft', 'train', sys.argv[1], '--set', 'train.backend=unsloth', '--output', sys.argv[2]]
try:
    main()
finally:
    print(json.dumps(seen))
"""


def test_train_chooses_its_backend_before_importing_the_libraries_unsloth_patches(tmp_path):
    """unsloth must be imported before transformers, TRL and peft: `ft train` decides (and would
    import unsloth) while none of them is loaded. Here unsloth cannot run, so it then exits 2."""
    result = subprocess.run([sys.executable, "-c", SPY, str(RECIPE), str(tmp_path / "run")], cwd=ROOT,
                            capture_output=True, text=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"loaded_before": []}, result.stderr[-2000:]
    assert result.returncode == 2 and "unsloth cannot run here" in result.stderr


def test_loaded_facts_are_read_off_the_model():
    """The hub-layout Qwen3.5 (a vision-language checkpoint) loads as its text decoder, in NF4
    with double quantization, the family's skip list kept in 16-bit; a vision tower or other
    quantization settings than the recipe's are caught."""
    recipe = load_recipe(RECIPE, ["model.base=tiny-qwen3.5-hub"])
    prep = loading.prepare(recipe)
    model = load_model(recipe, prep, "hf", checkpointing=False)
    facts = loaded_facts(model)
    assert facts["class"] == "Qwen3_5ForCausalLM" and not facts["vision_tower"]
    assert facts["name_or_path"] == prep.base.path
    assert facts["quant_type"] == ["nf4"] and facts["double_quant"] == [True] and facts["linear_4bit"] > 0
    assert {"in_proj_a", "in_proj_b", "lm_head"} <= set(facts["kept_16bit"])
    assert not any(k.startswith("lora") for k in facts["kept_16bit"])
    check_loaded(facts, recipe, prep.base.path, "hf")
    with pytest.raises(RuntimeError, match="the recipe asks fp4"):
        check_loaded(facts, load_recipe(RECIPE, ["model.base=tiny-qwen3.5-hub", "quantization.quant_type=fp4"]),
                     prep.base.path, "unsloth")
    swapped = dict(facts, name_or_path="unsloth/Qwen3.5-9B-unsloth-bnb-4bit")
    with pytest.raises(RuntimeError, match="not Qwen/Qwen3.5-9B"):
        check_loaded(swapped, recipe, "Qwen/Qwen3.5-9B", "unsloth")

    from transformers import Qwen3_5ForConditionalGeneration

    whole = Qwen3_5ForConditionalGeneration.from_pretrained(prep.base.path)
    with pytest.raises(RuntimeError, match="vision tower"):
        check_loaded(loaded_facts(whole), load_recipe(RECIPE, ["model.base=tiny-qwen3.5-hub",
                                                               "quantization.load_in_4bit=false"]),
                     prep.base.path, "unsloth")


@pytest.mark.parametrize("base,layer", [("tiny-qwen3.5-hub", "Qwen3_5DecoderLayer"),
                                        ("tiny-olmo3-yarn", "Olmo3DecoderLayer")])
def test_sharded_qlora_keeps_one_dtype(base, layer):
    """Under FSDP every stored tensor of a flat parameter needs one dtype. Loaded as on a GPU
    (bf16 compute and 4-bit storage), peft's k-bit preparation upcasts norms and embeddings to
    fp32; ft's sharded preparation leaves every base tensor in bf16 (4-bit storage included)."""
    recipe = load_recipe(RECIPE, [f"model.base={base}"])
    prep = loading.prepare(recipe)
    peft_way = loading.load_base_model(recipe, prep.base, torch.bfloat16)
    prepare_for_training(peft_way, upcast_for_kbit=True, checkpointing=True)
    assert {p.dtype for p in peft_way.parameters()} == {torch.bfloat16, torch.float32}

    model = loading.load_base_model(recipe, prep.base, torch.bfloat16)
    prepare_for_training(model, upcast_for_kbit=False, checkpointing=True, reentrant=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert any(type(p).__name__ == "Params4bit" for p in model.parameters())
    assert model.is_gradient_checkpointing and not any(p.requires_grad for p in model.parameters())
    assert type(model.model.layers[0]).__name__ == layer == prep.base.family.decoder_layer


def test_fsdp_settings_are_fsdp1_qlora_without_double_checkpointing(tmp_path, monkeypatch):
    """ft's real TRL arguments for a 2-process FSDP run (built as train() builds them, before the
    model loads, which is when transformers reads FSDP's low-RAM loading switch from them)."""
    from finetune.distributed import BatchPlan, trainer_arguments
    from finetune.run import RunDir

    for name in ("FSDP_CPU_RAM_EFFICIENT_LOADING", "ACCELERATE_USE_FSDP", "FSDP_VERSION"):
        # set, then removed, so that monkeypatch removes what sft_config sets when the test ends
        # (left set, they would make every later accelerate process believe it runs FSDP)
        monkeypatch.setenv(name, "false")
        monkeypatch.delenv(name)
    recipe = load_recipe(RECIPE, ["distributed.strategy=fsdp"])
    family = resolve_base(recipe.model.base).family
    args = sft_config(recipe, RunDir(tmp_path / "run"), BatchPlan(4, 1, 2), family)
    assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 1 and plugin["use_orig_params"] is False
    assert plugin["activation_checkpointing"] is False  # checkpointing is the model's, set up once
    assert plugin["cpu_ram_efficient_loading"] and plugin["sync_module_states"]
    assert plugin["transformer_cls_names_to_wrap"] == "Qwen3_5DecoderLayer"
    assert not args.activation_checkpointing

    # transformers' low-RAM FSDP loading also needs accelerate's launcher switch, which
    # `accelerate launch --multi_gpu` does not set: ft does, before the model loads
    assert os.environ["ACCELERATE_USE_FSDP"] == "true" and os.environ["FSDP_VERSION"] == "1"
    import torch.distributed as dist
    from transformers.modeling_utils import is_fsdp_enabled

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        assert is_fsdp_enabled()
    finally:
        dist.destroy_process_group()
    assert args.eval_on_start  # the held-out loss before training is computed once the model is wrapped

    zero3 = trainer_arguments(load_recipe(RECIPE, ["distributed.strategy=deepspeed", "distributed.zero_stage=3"]),
                              "Qwen3_5DecoderLayer")["deepspeed"]
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero3["bf16"] == {"enabled": "auto"}  # follows TrainingArguments.bf16 (on for GPUs)


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharded_runs_use_the_hf_backend(monkeypatch, strategy):
    """`auto` never picks unsloth when the weights are sharded (unsloth keeps its fused LoRA
    kernels on under FSDP unless the launcher says FSDP, and they read whole 4-bit weights);
    `backend: unsloth` is refused there with the fix. Decided before unsloth is imported, so no
    GPU is needed to check it."""
    from finetune.train.backends import pick_backend

    monkeypatch.setenv("WORLD_SIZE", "2")
    recipe = load_recipe(RECIPE, [f"distributed.strategy={strategy}"])
    assert pick_backend(recipe) == "hf"
    with pytest.raises(UserError, match="cannot train under distributed.strategy") as info:
        pick_backend(load_recipe(RECIPE, [f"distributed.strategy={strategy}", "train.backend=unsloth"]))
    assert info.value.problems[0].where == "train.backend"
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process shards nothing: unsloth may run (where it can)
    assert pick_backend(load_recipe(RECIPE, [f"distributed.strategy={strategy}", "train.backend=hf"])) == "hf"


def test_missing_linear_attention_kernels_are_said_before_training():
    """On CUDA without flash-linear-attention / causal-conv1d, Qwen3.5's linear-attention layers run
    transformers' PyTorch loop: train() prints this with the preflight lines and records it in the
    manifest (linear_attention_kernels_missing). The kernels' presence is handed in: neither
    package runs on this CPU."""
    from finetune.models import OLMO3, QWEN3_5
    from finetune.train.packing import VarlenKernels, missing_kernels_note

    note = missing_kernels_note(QWEN3_5, gpu=True, kernels=VarlenKernels())
    assert "flash-linear-attention and causal-conv1d" in note and "1.22 s against 0.70 s" in note
    assert "pip install flash-linear-attention causal-conv1d" in note
    only_conv = missing_kernels_note(QWEN3_5, gpu=True, kernels=VarlenKernels(delta_rule=print))
    assert "without causal-conv1d," in only_conv
    assert missing_kernels_note(QWEN3_5, gpu=True, kernels=VarlenKernels(conv=print, delta_rule=print)) is None
    assert missing_kernels_note(QWEN3_5, gpu=False, kernels=VarlenKernels()) is None  # no kernels on a CPU
    assert missing_kernels_note(OLMO3, gpu=True, kernels=VarlenKernels()) is None  # nothing to miss


def test_auto_says_why_it_fell_back_when_unsloth_does_not_import(monkeypatch):
    """`backend: auto` on a CUDA machine with an unsloth that fails to import trains with hf: the
    reason is said (preflight's lines, printed once by ft train) and kept in manifest.json. On a
    CPU, or where the recipe rules unsloth out, falling back is by design and nothing is said."""
    import sys

    import torch

    from finetune.train.backends import auto_fallback, pick_backend

    recipe = load_recipe(RECIPE)
    assert auto_fallback(recipe, "hf") is None or torch.cuda.is_available()  # a CPU: by design
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "unsloth", None)  # `import unsloth` raises ImportError
    assert pick_backend(recipe) == "hf"
    note = auto_fallback(recipe, "hf")
    assert note.startswith("train.backend auto: trained with hf, not unsloth: unsloth does not import (ModuleNotFoundError")
    assert auto_fallback(load_recipe(RECIPE, ["lora.dora=true"]), "hf") is None  # ruled out by the recipe
    assert auto_fallback(load_recipe(RECIPE, ["train.backend=hf"]), "hf") is None
