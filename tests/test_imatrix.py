"""The importance matrix ft quantizes with: llama.cpp's activations on the 16-bit file, checked
against an independent recomputation in transformers mapped through the converter's own
transforms; a misnamed, misshapen or permuted matrix does not pass as calibrated; the quantizer
is fed it, and its slab size changes no byte of the output.

Not exercised here: llama.cpp's `llama-imatrix` tool itself (llama-cpp-python does not build its
tools; export/imatrix.py reproduces its collector's arithmetic on the same graph callback) and
3-D expert weights (no architecture ft converts has them)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from export import imatrix
from export.arches import arch_for
from export.llama import native_log
from export.quantize import quantize
from export.runner import export_run
from finetune.run import RunDir

pytestmark = pytest.mark.slow


def training_sequences(run: RunDir, budget: int) -> list[list[int]]:
    from export.runner import calibration_sequences, prepared_for_export, read_adapter_info
    from finetune.recipe import load_recipe

    recipe = load_recipe(run.recipe)
    return calibration_sequences(recipe, prepared_for_export(run, recipe, read_adapter_info(run)), budget)


def input_permutation(transform, shape: tuple[int, int]) -> torch.Tensor:
    """Which HF input channel each GGUF input channel is, read off the converter's own transform
    applied to a grid of column numbers (every row must carry the same permutation)."""
    grid = torch.arange(shape[1], dtype=torch.float32).expand(shape[0], -1).contiguous()
    moved = transform(grid) if transform else grid
    permutation = moved[0].long()
    assert torch.equal(moved, permutation.float().expand_as(moved)), "the transform mixes input channels"
    return permutation


def transformers_importance(run: RunDir, sequences: list[list[int]]) -> tuple[dict, dict]:
    """Mean squared input of every decoder-layer linear weight of the merged model in transformers
    (fp32), keyed by the GGUF name ft's converter gives that weight: in the GGUF's channel order,
    and in transformers' own."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from export.checkpoint import Checkpoint, read_config

    info = json.loads((run.adapter / "ft_adapter.json").read_text())
    base_dir = __import__("pathlib").Path(info["base_path"])
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(run.adapter)).merge_and_unload().eval()
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            module.register_forward_pre_hook(hook(name + ".weight"))
    with torch.no_grad():
        for ids in sequences:
            model(torch.tensor([ids]))
    tokens = sum(map(len, sequences))
    cfg = read_config(base_dir)
    ckpt = Checkpoint.open(base_dir)
    arch = arch_for(info["gguf_arch"])
    result, unpermuted = {}, {}
    for plan in arch.plan(ckpt.text_tensors(), ckpt.shape, cfg):
        hf_name = plan.weight_name.replace("model.language_model.", "model.")
        if hf_name not in sums:
            continue
        mean = (sums[hf_name] / tokens).float()
        result[plan.gguf_name] = mean[input_permutation(plan.transform, ckpt.shape(plan.source))].numpy()
        unpermuted[plan.gguf_name] = mean.numpy()
    return result, unpermuted


@pytest.fixture(scope="module")
def calibrated_qwen(qwen_run, tmp_path_factory):
    """The Qwen3.5 twin's verified 16-bit file and ft's importance matrix of it."""
    from export.checkpoint import Checkpoint, local_snapshot, read_config
    from export.gguf_file import write_gguf
    from export.merge import Adapter
    from export.runner import family_named, read_adapter_info, served_template
    from export.vocab import add_vocab
    from transformers import AutoTokenizer

    work = tmp_path_factory.mktemp("imatrix")
    info = read_adapter_info(qwen_run)
    base_dir = local_snapshot(info.base_path)
    cfg, family = read_config(base_dir), family_named(info.family)
    tokenizer = AutoTokenizer.from_pretrained(qwen_run.adapter)
    sixteen = work / "f16.gguf"
    write_gguf(sixteen, arch_for(info.gguf_arch), cfg, Checkpoint.open(base_dir), Adapter(qwen_run.adapter), "f16",
               lambda w: add_vocab(w, tokenizer, qwen_run.adapter, family.gguf_pre, family.end_of_turn[0],
                                   cfg["vocab_size"], served_template(family, info.template_kwargs)),
               {"name": "t", "license": ""})
    sequences = training_sequences(qwen_run, 1024)
    return sixteen, sequences, imatrix.collect(sixteen, sequences, work / "llama.log")


def test_importance_equals_an_independent_recomputation_in_transformers(qwen_run, calibrated_qwen):
    """Every quantized matrix of the Qwen3.5 twin (2 key heads, 4 value heads: ssm_out's input
    channels are reordered by the converter) has the importance transformers computes for it."""
    sixteen, sequences, importance = calibrated_qwen
    ours = importance.means()
    reference, unpermuted = transformers_importance(qwen_run, sequences)
    assert importance.tokens == sum(map(len, sequences)) >= 1000
    assert set(ours) == set(reference) == set(imatrix.quantizable_weights(sixteen))
    assert any(".ssm_out." in n for n in ours) and any(".attn_qkv." in n for n in ours)
    for name, vector in ours.items():
        np.testing.assert_allclose(vector, reference[name], rtol=2e-2, atol=1e-6, err_msg=name)
    # the check can tell: ssm_out's importance in HF's (grouped) value-head order is not the file's
    name = next(n for n in ours if ".ssm_out." in n)
    assert not np.allclose(ours[name], unpermuted[name], rtol=2e-2, atol=1e-6)


def test_a_misnamed_misshapen_or_broken_matrix_does_not_pass(calibrated_qwen):
    sixteen, _, importance = calibrated_qwen
    weights = imatrix.quantizable_weights(sixteen)
    imatrix.check_covers(importance, weights)
    name = sorted(importance.sums)[0]
    cases = {
        "missing": {n: s for n, s in importance.sums.items() if n != name},
        "unknown": {**{n: s for n, s in importance.sums.items() if n != name}, name.replace("blk.", "blk.9"): importance.sums[name]},
        "wrong width": {**importance.sums, name: importance.sums[name][:-1]},
        "not finite": {**importance.sums, name: np.full_like(importance.sums[name], np.nan)},
    }
    for case, sums in cases.items():
        with pytest.raises(RuntimeError, match=case):
            imatrix.check_covers(imatrix.Importance(sums, importance.tokens, importance.sequences), weights)


def test_the_quantizer_reads_the_matrix_and_its_slabs_change_no_byte(calibrated_qwen, tmp_path):
    sixteen, _, importance = calibrated_qwen
    log = tmp_path / "llama.log"
    files = {}
    for label, kwargs in {"plain": {}, "calibrated": {"importance": importance},
                          "calibrated, 8 GiB buffer": {"importance": importance, "buffer_bytes": 8 << 30},
                          "calibrated, 64 KiB slabs": {"importance": importance, "buffer_bytes": 64 << 10}}.items():
        files[label] = tmp_path / f"{len(files)}.gguf"
        with native_log(log):
            quantize(sixteen, files[label], "q4_k_m", **kwargs)
    import gguf

    data = {k: p.read_bytes() for k, p in files.items()}
    assert data["calibrated"] == data["calibrated, 8 GiB buffer"] == data["calibrated, 64 KiB slabs"]
    # the quantizer found a vector for every matrix: each one rounds differently than without
    plain, calibrated = ({t.name: t.data.tobytes() for t in gguf.GGUFReader(str(files[k])).tensors}
                         for k in ("plain", "calibrated"))
    changed = {n for n in importance.sums if plain[n] != calibrated[n]}
    assert changed == set(importance.sums)
    assert all(plain[n] == calibrated[n] for n in plain if not n.startswith("blk."))  # embedding, output


def test_the_matrix_is_kept_in_llama_cpps_own_file_format(calibrated_qwen, tmp_path):
    """What `llama-quantize --imatrix` reads (common/imatrix-loader.cpp): `<name>.in_sum2` sums and
    `<name>.counts` token counts, F32, with the imatrix.* keys."""
    import gguf

    _, _, importance = calibrated_qwen
    path = tmp_path / "imatrix.gguf"
    imatrix.write_imatrix_gguf(path, importance, "training conversations")
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {f"{n}.{kind}" for n in importance.sums for kind in ("in_sum2", "counts")}
    for name, sums in importance.sums.items():
        assert tensors[f"{name}.in_sum2"].tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_allclose(tensors[f"{name}.in_sum2"].data.flatten(), sums, rtol=1e-6)
        assert tensors[f"{name}.counts"].data.flatten().tolist() == [importance.tokens]
    assert {"imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size", "general.type"} <= set(reader.fields)


def test_export_calibrates_by_default_and_records_it(qwen_run, tmp_path):
    run = RunDir(tmp_path / "run")
    shutil.copytree(qwen_run.root, run.root)
    report = export_run(run, "q4_k_m", progress=lambda m: None)
    assert report.verify.passed
    recorded = json.loads((run.export_dir / "export.json").read_text())["imatrix"]
    assert recorded["tensors"] > 0 and recorded["conversations"] > 0 and recorded["tokens"] >= 256
    kl = recorded["kl_vs_16bit"]
    assert recorded["used"] == (kl["calibrated"] <= kl["uncalibrated"])
    assert (run.export_dir / "imatrix.gguf").is_file() == recorded["used"]
    report = export_run(run, "q4_k_m", calibrated=False, progress=lambda m: None)
    assert report.imatrix is None and not (run.export_dir / "imatrix.gguf").exists()
    assert not list(run.export_dir.glob(".*"))


def test_quant_auto_ships_the_smallest_candidate_within_tolerance(qwen_run, tmp_path):
    """Through the CLI: three candidates scored on the held-out set against the 16-bit file; the
    report lists each, the choice is the smallest whose every task metric's interval stays within
    the tolerance, and that file ships verified under its own type's name."""
    from finetune.recipe import load_recipe
    from finetune.run import atomic_write_text
    from tests.conftest import run_ft

    run = RunDir(tmp_path / "run")
    shutil.copytree(qwen_run.root, run.root)
    recipe = load_recipe(run.recipe, ["export.candidates=[q8_0, q4_k_m, q2_k]", "eval.max_examples=8",
                                      "export.calibration_tokens=512"])
    atomic_write_text(run.recipe, recipe.to_yaml())
    result = run_ft("export", str(run.root), "--quant", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    auto = json.loads((run.export_dir / "quant_auto.json").read_text())
    assert list(auto["candidates"]) == ["q8_0", "q4_k_m", "q2_k"] and auto["examples"] == 8
    sizes = [c["size"] for c in auto["candidates"].values()]
    assert sizes == sorted(sizes, reverse=True)
    for row in auto["candidates"].values():  # the verdict is what the intervals say
        gated = [m for m in row["metrics"].values() if m["gated"]]
        assert gated and row["within"] == all(m["within"] for m in gated)
        for m in gated:
            assert m["low"] <= m["delta"] <= m["high"]
    passing = [q for q, c in auto["candidates"].items() if c["within"]]
    assert auto["chosen"] == min(passing, key=lambda q: auto["candidates"][q]["size"])
    shipped = run.export_dir / f"tiny-support-{auto['chosen']}.gguf"
    assert shipped.stat().st_size == auto["candidates"][auto["chosen"]]["size"]
    report = json.loads((run.export_dir / "export.json").read_text())
    assert report["quant"] == auto["chosen"] and report["verify"]["passed"]
    assert not list(run.export_dir.glob(".*partial")) and f"auto chose {auto['chosen']}" in result.stdout
    modelfile = (run.export_dir / "Modelfile").read_text()
    assert f"FROM ./{shipped.name}" in modelfile


def test_inputs_no_calibration_token_drove_do_not_zero_the_weights(calibrated_qwen, tmp_path):
    """A matrix whose inputs were all zero in calibration (a 9B-shaped random checkpoint's ssm_out,
    behind a zero gated norm) and channels that were never driven: quantized as faithfully as
    without calibration, not to zeros (verification's structure check is the judge)."""
    from export.verify import BOUNDS, structure

    sixteen, _, importance = calibrated_qwen
    silent = next(n for n in importance.sums if ".ssm_out." in n)
    partly = next(n for n in importance.sums if ".ffn_down." in n)
    sums = {**importance.sums, silent: np.zeros_like(importance.sums[silent]),
            partly: np.where(np.arange(importance.sums[partly].size) % 2 == 0, 0.0, importance.sums[partly])}
    dead = imatrix.Importance(sums, importance.tokens, importance.sequences)
    vectors, uncalibrated = imatrix.quantizer_vectors(dead)
    assert uncalibrated == [silent] and silent not in vectors and vectors[partly].min() > 0
    shipped = tmp_path / "q4_k_m.gguf"
    with native_log(tmp_path / "llama.log"):
        quantize(sixteen, shipped, "q4_k_m", importance=dead)
    built = structure(sixteen, shipped)
    assert not built["tensors_over_bound"], built["tensors_over_bound"]
    assert max(built["worst_relative_error_by_type"].values()) < BOUNDS.structure_rel_error_max
