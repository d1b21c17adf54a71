"""`ft export RUN`: merge → GGUF → quantize → Modelfile → verify, with nothing half-written.

    runs/<name>/export/
      <name>-<quant>.gguf    the shipped file (verified)
      <name>-f16.gguf        the 16-bit intermediate, kept with --keep-f16
      imatrix.gguf           the importance matrix the file was quantized with (llama.cpp's format)
      Modelfile              for `ollama create`
      verify.json            tokenizer parity, logit parity (16-bit and shipped), stops
      export.json            what was done: sizes, times, peak memory, merged and skipped tensors
      llama.log              llama.cpp's own log from quantizing and verifying
      hf/                    with --format hf: merged safetensors shards, config, tokenizer

Every file is written under a temporary name and renamed when complete; a file that fails
verification is renamed to `<name>-<quant>.FAILED.gguf` and the command exits 4.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from export import verify as verify_mod
from export.arches import arch_for
from export.checkpoint import Checkpoint, local_snapshot, read_config
from export.gguf_file import write_gguf
from export.merge import Adapter
from export.modelfile import modelfile
from export.quantize import SIXTEEN_BIT, quantize
from export.vocab import add_vocab
from finetune.errors import UserError, VerifyFailed
from finetune.adapter import read_adapter_info
from finetune.models import Family, family_named
from finetune.preflight import VERIFY_PROMPTS, verify_logits_bytes
from finetune.recipe import load_recipe
from finetune.run import RunDir, atomic_write_text, write_json



def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def return_freed_memory_to_the_os() -> None:
    """Make glibc serve every allocation of 1 MiB or more with its own mmap, so freeing it gives it
    back to the OS. By default glibc raises that threshold to the largest block freed so far (up to
    32 MiB), after which tensors of a few MB come from the heap and stay resident once freed: the
    streamed reference, which allocates and frees one layer after another, then held 1.8 GB of
    anonymous memory after it finished on a 3 GB checkpoint, 0.45 GB with this (bench/RESULTS.md).
    Export only: training reuses its buffers, and fresh pages for each would cost page faults."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        except OSError:  # not glibc (musl): nothing to tune
            pass


def served_template(family: Family, template_kwargs: dict) -> str:
    """The official template with the trained mode pinned, so a runtime that renders the GGUF's
    own Jinja template (Ollama ≥ 0.30 may prefer it over TEMPLATE) produces the trained format."""
    pins = "".join(f"{{%- set {k} = {str(v).lower()} %}}\n" for k, v in template_kwargs.items())
    return pins + family.read_template()


# quant types llama.cpp quantizes without reading an importance matrix (Q8_0 rounds each block)
UNCALIBRATED = ("q8_0",)


def calibration_sequences(recipe, renderer, budget: int) -> list[list[int]]:
    """The run's training conversations as the model saw them (served prompt, then the answer),
    in a fixed shuffled order, until `budget` tokens: what the shipped model will be asked."""
    import random

    from finetune.data import load_splits
    from finetune.render import fit

    examples = list(load_splits(recipe).train)
    random.Random(recipe.train.seed).shuffle(examples)
    sequences, tokens = [], 0
    for example in examples:
        for row in renderer.rows(example):
            row = fit(row, recipe.data.max_length)
            if row is None:
                continue
            sequences.append(row.input_ids[:budget - tokens])
            tokens += len(sequences[-1])
            if tokens >= budget:
                return sequences
    return sequences


def renderer_of(recipe, family: Family, tokenizer, kwargs: dict):
    from finetune.render import Renderer
    from finetune.loading import training_template

    template, where = training_template(recipe, family)
    return Renderer(tokenizer, template, family.read_template(), kwargs, where)


def calibrate(run: RunDir, recipe, family: Family, tokenizer, kwargs: dict, sixteen: Path, log: Path,
              progress) -> tuple[object, dict]:
    """The importance matrix of the verified 16-bit file on the training conversations."""
    from export import imatrix

    sequences = calibration_sequences(recipe, renderer_of(recipe, family, tokenizer, kwargs),
                                      recipe.export.calibration_tokens)
    progress(f"calibrating: importance of every weight on {sum(map(len, sequences)):,} tokens of "
             f"{len(sequences)} training conversations")
    t0 = time.monotonic()
    importance = imatrix.collect(sixteen, sequences, log)
    imatrix.check_covers(importance, imatrix.quantizable_weights(sixteen))
    _, silent = imatrix.quantizer_vectors(importance)
    return importance, {"tokens": importance.tokens, "conversations": importance.sequences,
                        "tensors": len(importance.sums), "silent_uncalibrated": silent,
                        "seconds": round(time.monotonic() - t0, 2)}


def heldout_sequences(recipe, renderer) -> list[list[int]]:
    """The held-out conversations verification compares logits on (the last turn rendered as trained)."""
    from finetune.data import load_splits

    return [renderer.final_turn(e)[1].input_ids for e in load_splits(recipe).heldout[:VERIFY_PROMPTS]]


def closer_to_16bit(sixteen: Path, files: dict[str, Path], sequences: list[list[int]], log: Path) -> dict[str, float]:
    """Mean KL of each file's next-token distribution from the 16-bit file's on `sequences`. The
    16-bit logits go to a file-backed array (positions × vocabulary floats: 2.4 GB for a 9B's
    vocabulary on 8 conversations), not the process's memory."""
    from export.llama import GGUFModel
    from export.verify import logit_parity

    n_ctx = max(map(len, sequences)) + 16
    scratch = sixteen.parent / ".closer-16bit-logits.npy.partial"
    starts = np.cumsum([0, *map(len, sequences)])
    try:
        with GGUFModel(sixteen, n_ctx, log) as model:
            reference = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.float32,
                                                  shape=(int(starts[-1]), model.llm.n_vocab()))
            for ids, at in zip(sequences, starts):
                reference[at:at + len(ids)] = model.logits(ids)
        kl = {}
        for label, path in files.items():
            with GGUFModel(path, n_ctx, log) as model:
                kl[label] = round(float(logit_parity(reference, model, sequences)["kl_mean"]), 6)
        return kl
    finally:
        scratch.unlink(missing_ok=True)


def export_run(run: RunDir, quant: str, keep_f16: bool = False, verify: bool = True, hf: bool = False,
               renderer: bool = False, progress=print, calibrated: bool = True, choose_quant=None) -> dict:
    """`quant` "auto" needs `choose_quant(sixteen_path, quantize_to) -> (quant, path, report)`
    (eval/quant_choice.py: it scores candidates on the held-out set; export cannot import eval)."""
    started = time.monotonic()
    return_freed_memory_to_the_os()
    info = read_adapter_info(run)
    recipe = load_recipe(run.recipe)
    family = family_named(info.family)
    arch = arch_for(info.gguf_arch)  # unknown architectures fail here, before any work
    base_dir = local_snapshot(info.base_path, recipe.model.revision)
    cfg = read_config(base_dir)
    arch.check(cfg)  # a config ft cannot convert faithfully: refused before any work
    ckpt = Checkpoint.open(base_dir)
    adapter = Adapter(run.adapter)
    adapter.check(ckpt, base_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run.adapter)
    out = run.export_dir
    from finetune.preflight import preflight_export

    report_preflight = preflight_export(base_dir, out, quant, hf,
                                        verify_logits_bytes(recipe.data.max_length, cfg["vocab_size"]) if verify else 0)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.partial"):  # left by a killed export
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    name = recipe.name
    sixteen = "bf16" if quant == "bf16" else "f16"
    sixteen_path = out / f"{name}-{sixteen}.gguf"
    shipped_path = out / f"{name}-{quant}.gguf"
    failed_path = out / f"{name}-{quant}.FAILED.gguf"
    failed_path.unlink(missing_ok=True)
    log = out / "llama.log"
    report: dict = {"run": str(run.root), "quant": quant, "base": str(base_dir), "arch": arch.name,
                    "preflight": report_preflight}

    # Until verified, everything lives under .partial names: a killed export leaves nothing
    # that looks finished, and the next run deletes the leftovers.
    sixteen_tmp = out / f".{sixteen_path.name}.partial"
    shipped_tmp = sixteen_tmp if quant in SIXTEEN_BIT else out / f".{shipped_path.name}.partial"
    progress(f"merging {len(adapter.deltas)} LoRA weights into {base_dir.name} and writing {sixteen} GGUF")
    t0 = time.monotonic()
    kwargs = info.template_kwargs
    report["convert"] = write_gguf(
        sixteen_tmp, arch, cfg, ckpt, adapter, sixteen,
        lambda w: add_vocab(w, tokenizer, run.adapter, family.gguf_pre, family.end_of_turn[0], cfg["vocab_size"],
                            served_template(family, kwargs)),
        {"name": name, "license": info.license})
    report["convert"]["seconds"] = round(time.monotonic() - t0, 2)

    imatrix_tmp = out / ".imatrix.gguf.partial"
    (out / "imatrix.gguf").unlink(missing_ok=True)  # a previous export's; this one's comes with its file
    if quant not in SIXTEEN_BIT:
        from export.llama import native_log

        importance = None
        if calibrated and quant not in UNCALIBRATED:
            importance, report["imatrix"] = calibrate(run, recipe, family, tokenizer, kwargs, sixteen_tmp, log,
                                                      progress)
            from export.imatrix import write_imatrix_gguf

            write_imatrix_gguf(imatrix_tmp, importance, f"{run.root.name} training conversations")
        else:
            report["imatrix"] = None

        def quantize_to(candidate: str, target: Path) -> None:
            with native_log(log):
                quantize(sixteen_tmp, target, candidate,
                         importance=importance if candidate not in UNCALIBRATED else None)

        t0 = time.monotonic()
        if quant == "auto":
            quant, chosen, report["auto"] = choose_quant(sixteen_tmp, quantize_to)
            shipped_path = out / f"{name}-{quant}.gguf"
            failed_path = out / f"{name}-{quant}.FAILED.gguf"
            shipped_tmp = out / f".{shipped_path.name}.partial"
            os.replace(chosen, shipped_tmp)
            report["quant"] = quant
        else:
            progress(f"quantizing to {quant} with llama.cpp" + (", calibrated" if importance else ""))
            quantize_to(quant, shipped_tmp)
            if importance is not None:
                # Calibration is not always better: on a 12-step SmolLM2 fine-tune its q4_k_m was
                # further from the 16-bit file (KL 0.071) than without it (0.059). Both are made
                # and the closer one ships (tests/test_real_model.py).
                plain_tmp = out / f".{name}-{quant}-uncalibrated.gguf.partial"
                with native_log(log):
                    quantize(sixteen_tmp, plain_tmp, quant)
                kl = closer_to_16bit(sixteen_tmp, {"calibrated": shipped_tmp, "uncalibrated": plain_tmp},
                                     heldout_sequences(recipe, renderer_of(recipe, family, tokenizer, kwargs)), log)
                report["imatrix"].update(kl_vs_16bit=kl, used=kl["calibrated"] <= kl["uncalibrated"])
                if report["imatrix"]["used"]:
                    plain_tmp.unlink()
                else:
                    progress(f"calibration moved {quant} further from the 16-bit file (KL {kl['calibrated']:.4f} "
                             f"against {kl['uncalibrated']:.4f}): shipping it uncalibrated")
                    os.replace(plain_tmp, shipped_tmp)
                    imatrix_tmp.unlink()
        report["quantize_seconds"] = round(time.monotonic() - t0, 2)

    if verify:
        progress("verifying: tokenizer parity, logit parity, stops")
        result = run_verification(run, recipe, family, tokenizer, base_dir, sixteen_tmp, shipped_tmp, kwargs, log)
        write_json(out / "verify.json", {"passed": result.passed, "failures": result.failures, **result.checks})
        report["verify"] = {"passed": result.passed, "failures": result.failures}
        if not result.passed:
            os.replace(shipped_tmp, failed_path)
            sixteen_tmp.unlink(missing_ok=True)
            imatrix_tmp.unlink(missing_ok=True)
            raise VerifyFailed(result.failures, failed_path)
    os.replace(shipped_tmp, shipped_path)
    if imatrix_tmp.is_file():
        os.replace(imatrix_tmp, out / "imatrix.gguf")
    if quant not in SIXTEEN_BIT:
        if keep_f16:
            os.replace(sixteen_tmp, sixteen_path)
        else:
            sixteen_tmp.unlink()

    atomic_write_text(out / "Modelfile", modelfile(
        shipped_path.name, family, recipe.data.system_prompt, recipe.export.num_ctx, recipe.export.temperature,
        recipe.export.top_p, info.license, renderer=renderer))
    if hf:
        from export.hf import write_hf

        progress("writing merged safetensors (--format hf)")
        report["hf"] = write_hf(out / "hf", ckpt, adapter, base_dir, run.adapter)
    report.update(files={p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()},
                  seconds=round(time.monotonic() - started, 2), peak_rss_mib=round(peak_rss_mib(), 1))
    write_json(out / "export.json", report)
    return report


def run_verification(run, recipe, family, tokenizer, base_dir, sixteen_path, shipped, kwargs, log):
    from export.reference import reference_logits
    from finetune.data import load_splits

    heldout = load_splits(recipe).heldout[:VERIFY_PROMPTS]
    renderer = renderer_of(recipe, family, tokenizer, kwargs)
    sequences = heldout_sequences(recipe, renderer)
    prompt_texts = [renderer.served_prompt(e.messages[:-1]) for e in heldout]
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in prompt_texts]
    stop_ids = {tokenizer.convert_tokens_to_ids(t) for t in family.end_of_turn}
    specials = [t for t in tokenizer.all_special_tokens] + list(family.end_of_turn)
    # The fine-tuned model as transformers + peft compute it, one layer in memory at a time; its
    # logits go to a file (file-backed pages, not the process's anonymous memory).
    logits_file = sixteen_path.parent / ".reference-logits.npy.partial"
    try:
        reference = reference_logits(base_dir, run.adapter, sequences, logits_file)
        return verify_mod.verify(
            tokenizer=tokenizer, reference=reference, sequences=sequences, prompts=prompts,
            prompt_texts=prompt_texts, stop_ids=stop_ids, specials=specials, sixteen_bit=sixteen_path,
            quantized=shipped, max_new_tokens=recipe.eval.max_new_tokens, log=log)
    finally:
        logits_file.unlink(missing_ok=True)


def ollama_create(name: str, modelfile_path: Path) -> str:
    """Run `ollama create` when the CLI is installed; otherwise say what to run."""
    command = ["ollama", "create", name, "-f", str(modelfile_path)]
    if shutil.which("ollama") is None:
        return "ollama is not installed here; on a machine with Ollama run:\n  " + " ".join(command)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"ollama create failed: {result.stderr.strip()[-500:]}", "--ollama",
                        "check that the Ollama server is running and recent enough (see REQUIRES in the Modelfile)")
    return f"created Ollama model '{name}': ollama run {name}"
