"""Export on trained tiny twins: real merge, real GGUF, real llama.cpp, real quantization."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from export.checkpoint import Checkpoint
from export.llama import GGUFModel
from export.merge import Adapter
from export.record import read_export_report
from export.runner import export_run
from finetune.errors import UserError, VerifyFailed
from finetune.recipe import load_recipe
from finetune.run import RunDir
from tests.conftest import assert_quiet, run_ft

pytestmark = pytest.mark.slow



# qwen_run, olmo_run, qwen_hub_run, qwen_tied_run, olmo_yarn_run: session fixtures in conftest.py


@pytest.mark.parametrize("which", ["qwen_hub_run", "qwen_tied_run", "olmo_yarn_run"])
def test_hub_layout_twins_train_export_and_evaluate_as_gguf(which, request, tmp_path):
    """The checkpoints users train are not flat CausalLM folders: Qwen3.5-9B is published as the
    vision-language class (text_config, model.language_model.*, a vision tower, an MTP head),
    OLMo 3 7B with legacy `rope_scaling` YaRN and a sliding window. Both twins are saved that way,
    trained, exported with verification and evaluated with the GGUF column; the held-out
    sequences are longer than the OLMo twin's window and YaRN original context (64). Qwen3.5's
    0.8B, 2B and 4B tie the output to the embedding: their twin's GGUF has no output.weight and
    llama.cpp's logits still match transformers'."""
    from gguf import GGUFReader

    run = copy_run(request.getfixturevalue(which), tmp_path)
    result = run_ft("export", str(run.root))
    assert result.returncode == 0, result.stderr[-3000:]
    verify = json.loads((run.export_dir / "verify.json").read_text())
    assert verify["passed"], verify["failures"]
    assert verify["logits_16bit"]["top1_agreement"] >= 0.99 and verify["logits_16bit"]["kl_mean"] < 1e-3
    report = read_export_report(run)
    reader = GGUFReader(run.export_dir / "tiny-support-q4_k_m.gguf")
    fields = {f.name: f for f in reader.fields.values()}
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) is (which != "qwen_tied_run")
    if which in ("qwen_hub_run", "qwen_tied_run"):
        skipped = report.convert.skipped
        assert any(n.startswith("model.visual.") for n in skipped) and any(n.startswith("mtp.") for n in skipped)
        assert not any("visual" in t.name or "mtp" in t.name for t in reader.tensors)
    else:
        assert "olmo2.rope.scaling.type" in fields and "olmo2.attention.sliding_window" in fields
        assert min(len(s) for s in heldout_sequences(run)) > 64  # past the window and the original context
    result = run_ft("eval", str(run.root), "--gguf", "--set", "eval.max_examples=8", "--set", "eval.max_new_tokens=32")
    assert result.returncode == 0, result.stderr[-3000:]
    columns = json.loads((run.eval_dir / "report.json").read_text())["columns"]
    assert columns == ["base", "fine-tuned", "gguf"]


def heldout_sequences(run: RunDir) -> list[list[int]]:
    from finetune.loading import prepare

    prep = prepare(load_recipe(run.recipe))
    return [prep.renderer.final_turn(e)[1].input_ids for e in prep.splits.heldout[:8]]


def copy_run(run: RunDir, dest) -> RunDir:
    shutil.copytree(run.root, dest / run.root.name, ignore=shutil.ignore_patterns("export", "eval", "checkpoints"))
    return RunDir(dest / run.root.name)


@pytest.mark.parametrize("which", ["qwen_run", "olmo_run"])
def test_export_is_verified_and_loads_in_llama_cpp(which, request, tmp_path):
    run = copy_run(request.getfixturevalue(which), tmp_path)
    report = export_run(run, "q4_k_m", keep_f16=True, progress=lambda m: None)
    out = run.export_dir
    verify = json.loads((out / "verify.json").read_text())
    assert verify["passed"], verify["failures"]
    assert verify["tokenizer"]["mismatches"] == [] and verify["tokenizer"]["identical"] >= 10
    assert verify["logits_16bit"]["top1_agreement"] >= 0.99 and verify["logits_16bit"]["kl_mean"] < 1e-3
    assert verify["logits_shipped"]["top1_agreement"] >= 0.8
    assert verify["stops"]["stop_rate"] >= 0.9  # the quantized model ends its answers
    name = "tiny-support"
    for file in (f"{name}-f16.gguf", f"{name}-q4_k_m.gguf"):
        with GGUFModel(out / file, n_ctx=64) as model:
            ids = model.tokenize("hello")
            assert model.logits(ids).shape == (len(ids), 768)
    assert not list(out.glob(".*partial*")) and not list(out.glob("*FAILED*"))
    modelfile = (out / "Modelfile").read_text()
    assert f"FROM ./{name}-q4_k_m.gguf" in modelfile
    assert report.convert.lora_merged == len(Adapter(run.adapter).deltas) > 0
    assert report.peak_rss_mib > 0
    from gguf import GGUFReader

    reader = GGUFReader(out / f"{name}-q4_k_m.gguf")
    types = {t.tensor_type.name for t in reader.tensors}
    assert "Q4_K" in types  # hidden 256: K-quants really apply


def test_intermediate_removed_without_keep_f16(qwen_run, tmp_path):
    run = copy_run(qwen_run, tmp_path)
    result = run_ft("export", str(run.root), "--quant", "q8_0")  # the CLI, verification on
    assert result.returncode == 0, result.stderr[-2000:]
    assert_quiet(result.stderr, run.root / "logs" / "export.log")
    names = sorted(p.name for p in run.export_dir.glob("*.gguf"))
    assert names == ["tiny-support-q8_0.gguf"]


def test_streaming_merge_equals_peft_merge_and_unload(qwen_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    info = json.loads((qwen_run.adapter / "ft_adapter.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(info["base_path"], dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, str(qwen_run.adapter)).merge_and_unload().state_dict()
    ckpt, adapter = Checkpoint.open(__import__("pathlib").Path(info["base_path"])), Adapter(qwen_run.adapter)
    assert len(adapter.deltas) == 25
    for name, delta in adapter.deltas.items():
        ours = delta.apply(ckpt.read(name))
        assert torch.allclose(ours, reference[name], atol=1e-6, rtol=0), name
        blocks = torch.cat([delta.apply(ckpt.read(name, slice(a, a + 100)), slice(a, a + 100))
                            for a in range(0, ours.shape[0], 100)])
        assert torch.equal(blocks, ours)  # row-block streaming changes nothing


def test_broken_conversion_fails_verification(qwen_run, tmp_path, monkeypatch):
    """Skip one transform (Qwen3.5's +1 on norms): verification must catch it."""
    from export import arches

    original = arches.Qwen35.transform

    def without_norm_offset(self, name, cfg):
        lookup, fn = original(self, name, cfg)
        return (lookup, None) if name.endswith("layernorm.weight") else (lookup, fn)

    monkeypatch.setattr(arches.Qwen35, "transform", without_norm_offset)
    run = copy_run(qwen_run, tmp_path)
    with pytest.raises(VerifyFailed) as info:
        export_run(run, "q4_k_m", progress=lambda m: None)
    assert any("logits_16bit" in f for f in info.value.failures)
    name = "tiny-support"
    assert (run.export_dir / f"{name}-q4_k_m.FAILED.gguf").is_file()
    assert not (run.export_dir / f"{name}-q4_k_m.gguf").exists()
    assert not json.loads((run.export_dir / "verify.json").read_text())["passed"]


def untrained(run: RunDir) -> RunDir:
    """The same run with every lora_B zeroed: the fine-tuned model is the random-weight base."""
    from safetensors.torch import load_file, save_file

    path = run.adapter / "adapter_model.safetensors"
    tensors = {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return run


def test_faithful_export_of_a_random_weight_model_passes(qwen_run, tmp_path):
    """A model that never stops and has no decisive token (random weights) is exported faithfully:
    verification compares the shipped file with it, not with what a trained model would do."""
    run = untrained(copy_run(qwen_run, tmp_path))
    export_run(run, "q4_k_m", progress=lambda m: None)
    verify = json.loads((run.export_dir / "verify.json").read_text())
    assert verify["passed"], verify["failures"]
    assert verify["logits_16bit"]["top1_agreement"] >= 0.99
    assert verify["stops"]["stop_rate"] >= verify["stops"]["fine_tuned_stop_rate"] - 0.25


def test_a_shipped_file_of_another_model_fails_verification(qwen_run, tmp_path, monkeypatch):
    """Negative control: the trained run's export ships a faithful Q4_K_M of the *untrained* base
    instead. The twin is too flat for decisive positions, and its KL (0.19) is within what a deep
    random-weight model's faithful Q4_K_M reaches, so it is the behaviour check that must give it
    away: the impostor never stops where the fine-tuned model does."""
    import export.runner

    other = untrained(copy_run(qwen_run, tmp_path / "other"))
    export_run(other, "q4_k_m", verify=False, progress=lambda m: None)
    impostor = other.export_dir / "tiny-support-q4_k_m.gguf"
    monkeypatch.setattr(export.runner, "quantize", lambda src, dst, quant, **kwargs: shutil.copy(impostor, dst))
    run = copy_run(qwen_run, tmp_path)
    with pytest.raises(VerifyFailed) as info:
        export_run(run, "q4_k_m", progress=lambda m: None)
    assert any(f.startswith("stops") for f in info.value.failures), info.value.failures
    shipped = json.loads((run.export_dir / "verify.json").read_text())["logits_shipped"]
    assert shipped["kl_mean"] > 10 * json.loads((run.export_dir / "verify.json").read_text())["logits_16bit"]["kl_mean"]


@pytest.mark.parametrize("which", ["qwen_run", "olmo_run"])
def test_streamed_reference_equals_the_merged_model(which, request, tmp_path, monkeypatch):
    """Verification's reference (one layer in memory at a time, adapter applied by peft, logits in
    vocabulary blocks) computes what peft's merge_and_unload() model computes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from export import reference as reference_mod
    from finetune.loading import prepare

    run = request.getfixturevalue(which)
    prep = prepare(load_recipe(run.recipe))
    sequences = [prep.renderer.final_turn(e)[1].input_ids for e in prep.splits.heldout[:4]]
    monkeypatch.setattr(reference_mod, "VOCAB_BLOCK_BYTES", 64 * 256 * 4)  # several vocabulary blocks
    streamed = reference_mod.reference_logits(Path(prep.base.path), run.adapter, sequences, tmp_path / "r.npy")
    base = AutoModelForCausalLM.from_pretrained(prep.base.path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(run.adapter)).merge_and_unload().eval()
    with torch.no_grad():
        expected = torch.cat([merged(torch.tensor([s])).logits[0] for s in sequences])
    torch.testing.assert_close(torch.from_numpy(np.asarray(streamed)), expected, rtol=1e-4, atol=1e-4)


def test_unconvertible_config_fails_before_any_work(qwen_run, tmp_path):
    run = copy_run(qwen_run, tmp_path)
    info_path = run.adapter / "ft_adapter.json"
    info = json.loads(info_path.read_text())
    base = tmp_path / "base"
    shutil.copytree(info["base_path"], base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "layer_types": config["layer_types"][:-1]}))
    info_path.write_text(json.dumps({**info, "base_path": str(base)}))
    result = run_ft("export", str(run.root))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "config.json layer_types" in result.stderr and "fix:" in result.stderr
    assert not run.export_dir.exists()


def test_unknown_architecture_fails_before_any_work(qwen_run, tmp_path):
    run = copy_run(qwen_run, tmp_path)
    info_path = run.adapter / "ft_adapter.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "gguf_arch": "mamba2"}))
    result = run_ft("export", str(run.root))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "mamba2" in result.stderr and "supported: llama, olmo2, qwen3, qwen35" in result.stderr
    assert not run.export_dir.exists()


def test_export_of_a_run_without_adapter_is_refused(tmp_path, qwen_run):
    run = copy_run(qwen_run, tmp_path)
    shutil.rmtree(run.adapter)
    result = run_ft("export", str(run.root))
    assert result.returncode == 2 and "no complete adapter" in result.stderr


def test_hf_format_loads_and_matches(qwen_run, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from export import hf

    monkeypatch.setattr(hf, "SHARD_BYTES", 1 << 20)  # a 6 MB model in several shards, like a 9B in 2 GB ones
    run = copy_run(qwen_run, tmp_path)
    export_run(run, "f16", verify=False, hf=True, progress=lambda m: None)
    shards = sorted((run.export_dir / "hf").glob("model-*.safetensors"))
    assert len(shards) > 2 and (run.export_dir / "hf" / "model.safetensors.index.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(run.export_dir / "hf", dtype=torch.float32)
    assert type(merged).__name__ == "Qwen3_5ForCausalLM"
    assert (run.export_dir / "hf" / "tokenizer.json").is_file()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    from peft import PeftModel

    info = json.loads((run.adapter / "ft_adapter.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(info["base_path"], dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, str(run.adapter)).merge_and_unload()
    with torch.no_grad():
        # the shipped safetensors keep the base's bf16: compare at bf16 precision
        assert torch.allclose(merged(ids).logits, reference(ids).logits, atol=0.05)


def test_eval_gguf_column(qwen_run, tmp_path):
    run = copy_run(qwen_run, tmp_path)
    export_run(run, "q4_k_m", verify=False, progress=lambda m: None)
    result = run_ft("eval", str(run.root), "--gguf", "--set", "eval.max_examples=8")
    assert result.returncode == 0, result.stderr[-2000:]
    assert_quiet(result.stderr, run.root / "logs" / "eval.log")
    assert "gguf" in result.stdout
    report = json.loads((run.eval_dir / "report.json").read_text())
    assert report["columns"] == ["base", "fine-tuned", "gguf"]
    stop = next(m for m in report["metrics"] if m["name"] == "clean_stop")
    assert stop["values"]["gguf"] >= 0.9  # the shipped file stops like the fine-tune


def test_missing_gguf_for_eval_is_a_clear_error(qwen_run, tmp_path):
    run = copy_run(qwen_run, tmp_path)
    result = run_ft("eval", str(run.root), "--gguf")
    assert result.returncode == 2 and "ft export" in result.stderr
    with pytest.raises(UserError):
        from eval.runner import shipped_gguf

        shipped_gguf(run, load_recipe(run.recipe))


def test_an_adapter_on_another_base_is_refused_with_its_mismatches_counted(qwen_run, olmo_twin):
    """The Qwen3.5 twin's adapter against the OLMo twin's checkpoint: refused before any work, the
    first eight mismatches named, the rest counted, one fix."""
    from export.checkpoint import Checkpoint
    from export.merge import Adapter
    from finetune.errors import UserError

    adapter = Adapter(qwen_run.adapter)
    with pytest.raises(UserError) as info:
        adapter.check(Checkpoint.open(olmo_twin), olmo_twin)
    problems = info.value.problems
    more = re.fullmatch(r"and (\d+) more adapter weights like these", problems[-1].what)
    assert len(problems) == 9 and more and 0 < int(more[1]) <= len(adapter.deltas) - 8, problems[-1]
    assert all("adapter" in p.what and "olmo" in p.where for p in problems[:8])
    assert "different base model" in info.value.render() and info.value.render().count("fix:") == 1
