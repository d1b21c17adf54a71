"""Export on trained tiny twins: real merge, real GGUF, real llama.cpp, real quantization."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from export.checkpoint import Checkpoint
from export.llama import GGUFModel
from export.merge import Adapter
from export.runner import export_run
from finetune.errors import UserError, VerifyFailed
from finetune.recipe import load_recipe
from finetune.run import RunDir
from finetune.train import train
from tests.conftest import ROOT, assert_quiet, run_ft

pytestmark = pytest.mark.slow

TINY = ROOT / "recipes" / "tiny-support.yaml"


def trained_run(root, base: str) -> RunDir:
    recipe = load_recipe(TINY, [f"model.base={base}", "data.limit=160", "data.heldout_max=16",
                                "train.max_steps=40", "train.lr=3e-3", "train.batch_size=8",
                                "eval.max_new_tokens=48", "eval.batch_size=16", "train.save_steps=40"])
    run = RunDir(root / base)
    train(recipe, run)
    return run


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory):
    return trained_run(tmp_path_factory.mktemp("export"), "tiny-qwen3.5")


@pytest.fixture(scope="module")
def olmo_run(tmp_path_factory):
    return trained_run(tmp_path_factory.mktemp("export"), "tiny-olmo3")


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
    assert report["convert"]["lora_merged"] == len(Adapter(run.adapter).deltas) > 0
    assert report["peak_rss_mib"] > 0
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
