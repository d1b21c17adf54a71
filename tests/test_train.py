"""Real QLoRA training on the tiny twins: 4-bit base, LoRA-only gradients, loss falls, a complete
run folder. (Kill-and-resume is in test_reliability.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from finetune.recipe import load_recipe
from finetune.run import RunDir
from finetune.loading import prepare
from finetune.train.lora import load_model, trainable_parameters
from finetune.train.runner import train
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

TINY = ROOT / "recipes" / "tiny-support.yaml"
SMALL = ["data.limit=48", "data.heldout_max=12", "train.batch_size=4", "eval.batch_size=12",
         "train.logging_steps=2"]


def recipe_for(base: str, *extra: str):
    return load_recipe(TINY, [f"model.base={base}", *SMALL, *extra])


def expected_lora_params(base: str, r: int) -> int:
    """r · (in + out) summed over the targeted layers, from the twin's config alone."""
    from finetune.twins import TWINS

    c = TWINS[base].config
    h, ff = c["hidden_size"], c["intermediate_size"]
    mlp = (h + ff) * 2 + (ff + h)  # gate, up, down
    if base == "tiny-qwen3.5":
        q_out = c["num_attention_heads"] * c["head_dim"] * 2  # query + output gate
        kv_out = c["num_key_value_heads"] * c["head_dim"]
        full = (h + q_out) + 2 * (h + kv_out) + (c["num_attention_heads"] * c["head_dim"] + h)
        key_dim = c["linear_num_key_heads"] * c["linear_key_head_dim"]
        value_dim = c["linear_num_value_heads"] * c["linear_value_head_dim"]
        linear = (h + 2 * key_dim + value_dim) + (h + value_dim) + (value_dim + h)  # qkv, z, out_proj
        n_full = c["num_hidden_layers"] // 4
        per_model = n_full * full + (c["num_hidden_layers"] - n_full) * linear
    else:
        per_model = c["num_hidden_layers"] * 4 * (h + h)  # q, k, v, o are hidden → hidden (MHA)
    return r * (per_model + c["num_hidden_layers"] * mlp)


@pytest.mark.parametrize("base", ["tiny-qwen3.5", "tiny-olmo3"])
def test_base_is_4bit_and_only_lora_trains(base):
    import bitsandbytes as bnb

    recipe = recipe_for(base)
    prep = prepare(recipe)
    model = load_model(recipe, prep, "hf")
    skip = set(prep.base.family.skip_4bit)
    linears = {name: m for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lora_" not in name}
    four_bit = [n for n, m in linears.items() if isinstance(m, bnb.nn.Linear4bit)]
    plain = [n for n, m in linears.items() if not isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit, "no 4-bit layers"
    assert all(n.split(".")[-1] in skip for n in plain), plain
    assert all(m.weight.quant_state.quant_type == "nf4" for m in linears.values()
               if isinstance(m, bnb.nn.Linear4bit))
    trainable, _ = trainable_parameters(model)
    assert trainable == expected_lora_params(base, recipe.lora.r)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("base", ["tiny-qwen3.5", "tiny-olmo3"])
def test_training_lowers_heldout_loss_and_writes_run_folder(tmp_path, base):
    recipe = recipe_for(base, "train.max_steps=12", "train.save_steps=6", "train.lr=3e-3")
    run = RunDir(tmp_path / "run")
    summary = train(recipe, run)
    assert summary.heldout_loss_end < summary.heldout_loss_start - 0.5
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "recipe.yaml",
                 "chat_template.train.jinja", "ft_adapter.json"):
        assert (run.adapter / name).is_file(), name
    assert not list(run.adapter.glob("*.bin")) and not list(run.root.glob(".adapter*"))
    manifest = json.loads(run.manifest.read_text())
    assert manifest["status"] == "complete" and manifest["seed"] == 42
    assert [len(h) for h in manifest["data_sha256"]["train"].values()] == [64]
    assert {"torch", "transformers", "peft", "trl", "bitsandbytes"} <= set(manifest["versions"])
    assert manifest["base"]["family"] in ("qwen3_5", "olmo3") and manifest["started"] and manifest["ended"]
    rows = run.read_metrics()
    assert rows[0]["step"] == 0 and rows[0]["eval_loss"] == pytest.approx(summary.heldout_loss_start)
    assert any("loss" in r and "tokens_per_s" in r for r in rows)
    assert run.loss_plot.stat().st_size > 1000
    assert (run.checkpoints / "checkpoint-12" / "trainer_state.json").is_file()
    adapter = json.loads((run.adapter / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and set(adapter["target_modules"]) == set(prep_targets(base))
    # a 4-bit base: TRL's SFTTrainer casts its adapters to bf16, on a CPU ft trains them in fp32
    # (finetune/train/trainer.keep_adapters_fp32); what was trained is what was saved
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(run.adapter / "adapter_model.safetensors")).values()} == {torch.float32}


def prep_targets(base: str):
    from finetune.models import REGISTRY

    return REGISTRY[base].family.lora_targets


def test_same_seed_gives_bit_identical_adapters_and_another_seed_does_not(tmp_path):
    """train.seed seeds the LoRA initialisation too (the adapters are drawn before the trainer
    seeds anything): two runs of one recipe write byte-identical adapter weights."""
    files = {}
    for name, seed in (("a", 42), ("b", 42), ("c", 7)):
        run = RunDir(tmp_path / name)
        train(recipe_for("tiny-qwen3.5", "train.max_steps=3", "train.save_steps=3", f"train.seed={seed}",
                         "eval.after_train=false"), run)
        files[name] = (run.adapter / "adapter_model.safetensors").read_bytes()
    assert files["a"] == files["b"]
    assert files["a"] != files["c"]


def test_unknown_lora_target_names_the_modules_that_exist(tmp_path):
    from tests.conftest import run_ft

    result = run_ft("train", str(TINY), "--output", str(tmp_path / "run"), "--set", "lora.targets=[q_proj,qkv]")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "lora.targets" in result.stderr
    assert "qkv" in result.stderr and "in_proj_qkv" in result.stderr  # what exists, to pick from


def test_allow_pickle_still_loads_safetensors(qwen_twin):
    """allow_pickle permits .bin weights; it must not stop a safetensors checkpoint from loading."""
    from finetune.loading import load_base_model

    recipe = recipe_for("tiny-qwen3.5", "model.allow_pickle=true")
    model = load_base_model(recipe, prepare(recipe).base)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_resume_refuses_when_a_data_file_changed(tmp_path):
    import shutil

    from finetune.errors import UserError
    from finetune.run import start_run

    data = tmp_path / "train.jsonl"
    shutil.copy(ROOT / "datasets" / "support" / "train.jsonl", data)
    recipe = recipe_for("tiny-qwen3.5", f"data.train={data}", "train.max_steps=2", "train.save_steps=2",
                        "eval.after_train=false")
    run = RunDir(tmp_path / "run")
    train(recipe, run)
    assert start_run(recipe, run, resume=True, overwrite=False)[0] is not None  # unchanged: resumes
    with data.open("a", encoding="utf-8") as f:
        f.write(data.read_text(encoding="utf-8").splitlines()[0] + "\n")
    with pytest.raises(UserError, match="data file changed since this run started") as info:
        start_run(recipe, run, resume=True, overwrite=False)
    assert str(data) in info.value.render() and "data.train" in info.value.render()


def test_report_to_tensorboard_writes_event_files_in_the_run_folder(tmp_path):
    """train.report_to: [tensorboard] logs the same curves as metrics.jsonl, read back with
    tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = RunDir(tmp_path / "run")
    train(recipe_for("tiny-qwen3.5", "train.max_steps=4", "train.logging_steps=1", "train.save_steps=4",
                     "eval.after_train=false", "train.report_to=[tensorboard]"), run)
    events = list((run.root / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, "no tensorboard event file in the run folder"
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    logged = {e.step: e.value for e in accumulator.Scalars("train/loss")}
    expected = {r["step"]: r["loss"] for r in run.read_metrics() if "loss" in r}
    assert sorted(logged) == sorted(expected) == [1, 2, 3, 4]
    assert all(abs(logged[s] - expected[s]) < 1e-4 for s in expected)


def test_report_to_an_uninstalled_tracker_is_a_clear_error(tmp_path):
    import importlib.util

    from finetune.errors import UserError
    from finetune.train.trainer import check_trackers

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(UserError, match="wandb, which is not installed") as info:
        check_trackers(recipe_for("tiny-qwen3.5", "train.report_to=[wandb]"))
    assert "pip install wandb" in info.value.render()


def test_auto_targets_need_one_match_and_named_targets_each():
    """A family's auto list may name kinds a variant lacks (a Qwen3.5 of linear-attention layers
    only has no q_proj); a target the recipe names must exist."""
    from finetune.errors import UserError
    from finetune.train.lora import check_lora_targets

    model = torch.nn.ModuleDict({"in_proj_qkv": torch.nn.Linear(4, 4), "down_proj": torch.nn.Linear(4, 4)})
    check_lora_targets(model, ["q_proj", "in_proj_qkv", "down_proj"], explicit=False)
    with pytest.raises(UserError, match="q_proj"):
        check_lora_targets(model, ["q_proj", "in_proj_qkv"], explicit=True)
    with pytest.raises(UserError, match="down_proj, in_proj_qkv"):
        check_lora_targets(model, ["q_proj", "k_proj"], explicit=False)


def test_tokens_are_counted_and_the_start_loss_is_evaluated_inside_train(tmp_path, monkeypatch):
    """Two things the GPU path needs, checked where a CPU reaches them.

    Tokens: unsloth replaces TRL's SFTTrainer.compute_loss with transformers' Trainer.compute_loss,
    so TRL's token count never runs (and unsloth trains unpacked): ft counts every batch's real
    tokens itself. One epoch of 12 tickets in 3 steps of 4: the count after the last step must be
    the training set's token total (the data report's), in a plain run and in one whose trainer
    computes the loss as unsloth's does, with tokens/s logged.

    Start loss: computed inside train(), after the Trainer has built its optimizer and prepared
    the model for its strategy. Evaluated before, FSDP1 wraps the model before peft gives the
    LoRA layers their own units and DeepSpeed builds a ZeRO-2 inference engine, and both die. Not
    exercised here: FSDP and DeepSpeed themselves (no CUDA GPU, no deepspeed)."""
    import trl
    from transformers import Trainer

    optimizer_when_evaluated = []
    evaluate = trl.SFTTrainer.evaluate

    def spy(self, *args, **kwargs):
        optimizer_when_evaluated.append(self.optimizer is not None)
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(trl.SFTTrainer, "evaluate", spy)
    overrides = ("data.limit=12", "train.max_steps=3", "train.logging_steps=1", "train.packing=false",
                 "train.save_steps=100")
    runs = {}
    for name in ("trl", "unsloth-like"):
        if name == "unsloth-like":
            monkeypatch.setattr(trl.SFTTrainer, "compute_loss", Trainer.compute_loss)
        runs[name] = RunDir(tmp_path / name)
        train(recipe_for("tiny-qwen3.5", *overrides), runs[name])
    assert optimizer_when_evaluated[0] is True  # the first evaluation came after train() prepared the model

    def counted(run):
        rows = [r for r in run.read_metrics() if "loss" in r]
        return [r.get("num_tokens") for r in rows], [r.get("tokens_per_s") for r in rows]

    for run in runs.values():
        tokens, speeds = counted(run)
        total = json.loads(run.manifest.read_text())["data"]["train_tokens"]["tokens"]
        assert tokens[-1] == total and all(t and t > 0 for t in tokens), (run.root.name, tokens, total)
        assert all(s and s > 0 for s in speeds[1:]), speeds
    assert counted(runs["trl"])[0] == counted(runs["unsloth-like"])[0]
    manifest = json.loads(runs["unsloth-like"].manifest.read_text())
    step0 = next(r for r in runs["unsloth-like"].read_metrics() if r["step"] == 0 and "eval_loss" in r)
    assert manifest["summary"]["heldout_loss_start"] == step0["eval_loss"]


def test_a_trl_that_cannot_train_on_this_machine_is_said_before_loading(monkeypatch):
    """TRL 1.15 scores only through Triton kernels; on a CPU every step died with an AttributeError
    deep in TRL. Checked against TRL 1.15 itself in the second venv (README, Tests); here the
    installed TRL must pass and one without the non-Triton path must be refused on a CPU."""
    from trl.trainer import utils as trl_utils

    from finetune.errors import UserError
    from finetune.train.trainer import check_trl_can_train_here

    if not hasattr(trl_utils, "_use_triton"):  # running on TRL 1.15 itself
        with pytest.raises(UserError, match="trl>=1.16"):
            check_trl_can_train_here(gpu=False)
        return
    check_trl_can_train_here(gpu=False)
    monkeypatch.delattr(trl_utils, "_use_triton")
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", None, raising=False)
    with pytest.raises(UserError, match="cannot train on a CPU") as refused:
        check_trl_can_train_here(gpu=False)
    assert refused.value.problems[0].where == "installed packages"


def test_bf16_compute_keeps_norms_embeddings_and_the_residual_stream_in_bf16(qwen_twin):
    """On a GPU compute is bf16: peft's k-bit preparation would upcast norms and embeddings to fp32
    and with them the whole residual stream (twice the activation memory preflight counts, and not
    what the published model, unsloth or the served GGUF compute). Loaded here as a GPU loads it
    (compute dtype bf16; bitsandbytes' 4-bit layers run on a CPU too): every frozen tensor outside
    the 4-bit layers is bf16, and so is what each decoder layer hands the next. Not exercised here:
    the CUDA kernels themselves."""
    import torch

    from finetune import loading
    from finetune.train.lora import load_model

    recipe = load_recipe(ROOT / "recipes" / "tiny-support.yaml", ["train.gradient_checkpointing=false"])
    prep = loading.prepare(recipe)
    model = load_model(recipe, prep, "hf", checkpointing=False, dtype=torch.bfloat16)
    frozen = {n: p.dtype for n, p in model.named_parameters()
              if not p.requires_grad and p.dtype.is_floating_point}
    assert frozen and set(frozen.values()) == {torch.bfloat16}, {n: d for n, d in frozen.items() if d != torch.bfloat16}
    seen = []
    layer = next(m for m in model.modules() if type(m).__name__ == prep.base.family.decoder_layer)
    layer.register_forward_hook(lambda module, args, out: seen.append((out[0] if isinstance(out, tuple) else out).dtype))
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    assert seen == [torch.bfloat16]



def test_the_training_order_is_the_seeds_and_sorting_a_step_keeps_its_rows():
    """finetune/train/order.py. Both orders come from the data seed and the epoch, not from the
    global RNG as it stands when an epoch starts (which a resumed process does not reproduce).
    Sorting each step's rows longest first keeps every step's rows (so its update) and cuts the
    padding; transformers' length grouping cuts it further. Lengths drawn in the support tickets'
    range (194-260 of Qwen3.5's tokens; on the real ones batches of 4 are 5.0% padding at random,
    3.2% sorted within steps of 8, 0.3% grouped)."""
    from finetune.train.order import LengthGroupedEpochs, StepsSortedByLength, sorted_within_steps

    lengths = torch.randint(194, 261, (480,), generator=torch.Generator().manual_seed(0)).tolist()

    def padding(order):
        return sum(4 * max(lengths[i] for i in order[k:k + 4]) for k in range(0, len(order), 4)) / sum(lengths) - 1

    shuffled = torch.randperm(480, generator=torch.Generator().manual_seed(0)).tolist()
    steps = sorted_within_steps(shuffled, lengths, 8)
    assert [sorted(steps[k:k + 8]) for k in range(0, 480, 8)] == [sorted(shuffled[k:k + 8]) for k in range(0, 480, 8)]
    assert padding(steps) < padding(shuffled) - 0.01, (padding(steps), padding(shuffled))
    for kind in (StepsSortedByLength, LengthGroupedEpochs):
        sampler = kind(lengths, 8, seed=42)
        torch.manual_seed(1)
        first = list(sampler)
        torch.manual_seed(2)
        assert list(sampler) == first and sorted(first) == list(range(480)), kind
        sampler.set_epoch(1)
        assert list(sampler) != first, kind  # each epoch its own order
    assert padding(list(LengthGroupedEpochs(lengths, 8, seed=42))) < 0.01


def test_a_step_sorted_by_length_trains_as_its_rows_in_random_micro_batches(tmp_path, monkeypatch):
    """Padded rows, 4 × 2 accumulated: each step's first micro-batch holds its 4 longest rows, and
    the adapter after 3 SGD steps is the one the same steps give with their rows in drawn order
    (the loss sums over the step's tokens: the same update in exact arithmetic). With
    train.group_by_length, transformers' grouping drawn from the seed; the held-out loss computed
    on the same batches either way (transformers would group those too)."""
    from safetensors.torch import load_file

    from finetune.train import order
    from finetune.train.guard import SafeTrainer

    seen, samplers = [], []
    step, sampler = SafeTrainer.training_step, SafeTrainer._get_train_sampler

    def spy_step(self, model, inputs, *args):
        seen.append(inputs["attention_mask"].sum(1).tolist())
        return step(self, model, inputs, *args)

    def spy_sampler(self, *args):
        samplers.append(sampler(self, *args))
        return samplers[-1]

    monkeypatch.setattr(SafeTrainer, "training_step", spy_step)
    monkeypatch.setattr(SafeTrainer, "_get_train_sampler", spy_sampler)
    common = ("data.limit=24", "train.max_steps=3", "train.batch_size=4", "train.grad_accum=2",
              "train.packing=false", "train.save_steps=100", "data.heldout_max=8", "train.rehearsal=0",
              # fp32 and plain SGD: bf16 rounds each padded shape its own way (2e-3 apart), and AdamW's
              # first steps turn a rounding-level gradient into ±lr
              "train.cpu_bf16=false", "train.optimizer=sgd")

    def trained(name, *extra):
        seen.clear()
        run = RunDir(tmp_path / name)
        train(recipe_for("tiny-qwen3.5", *common, *extra), run)
        adapter = load_file(run.root / "adapter" / "adapter_model.safetensors")
        return list(seen), adapter, json.loads(run.manifest.read_text())["summary"]["heldout_loss_start"]

    sorted_steps, sorted_adapter, start = trained("sorted")
    assert isinstance(samplers[-1], order.StepsSortedByLength) and len(sorted_steps) == 6
    for longer, shorter in zip(sorted_steps[0::2], sorted_steps[1::2]):
        assert min(longer) >= max(shorter), sorted_steps
    monkeypatch.setattr(order, "sorted_within_steps", lambda drawn, lengths, rows: drawn)
    drawn_steps, drawn_adapter, _ = trained("drawn")
    assert drawn_steps != sorted_steps  # the same rows, in other micro-batches
    for name, weight in sorted_adapter.items():
        if "lora_B" in name:  # zero at the start: the weight is the steps' summed updates
            error = float((weight - drawn_adapter[name]).norm() / drawn_adapter[name].norm())
            assert error < 1e-5, (name, error)  # measured 2e-7

    grouped_steps, _, grouped_start = trained("grouped", "train.group_by_length=true")
    assert isinstance(samplers[-1], order.LengthGroupedEpochs) and len(grouped_steps) == 6
    assert grouped_start == start
