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

import os
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np

from export import verify as verify_mod
from export.arches import arch_for
from export.checkpoint import Checkpoint, local_snapshot, read_config
from export.gguf_file import write_gguf
from export.merge import Adapter
from export.modelfile import modelfile
from export.quantize import SIXTEEN_BIT, quantize
from export.record import ConvertRecord, ExportReport, ImatrixRecord, VerifyOutcome, write_export_report
from export.verify import file_logits, logit_parity
from export.vocab import add_vocab
from finetune.adapter import AdapterInfo, read_adapter_info
from finetune.errors import UserError, VerifyFailed
from finetune.loading import Prepared, training_template
from finetune.models import Family, family_named
from finetune.serving import VERIFY_PROMPTS, verify_logits_bytes
from finetune.recipe import Recipe, load_recipe
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


# quant types llama.cpp quantizes without reading an importance matrix (Q8_0 rounds each block)
UNCALIBRATED = ("q8_0",)


@dataclass
class ExportJob:
    """What every step of one export reads, read once: the run's recipe, adapter and base, and its
    data as training rendered it (`prep`: the adapter's tokenizer, the trained template mode)."""

    run: RunDir
    recipe: Recipe
    info: AdapterInfo
    family: Family
    arch: object  # export.arches.Arch
    base_dir: Path
    cfg: dict
    ckpt: Checkpoint
    adapter: Adapter
    prep: Prepared
    report: ExportReport
    progress: Callable[[str], None]
    sixteen_kind: str = "f16"
    _sixteen_logits: np.ndarray | None = None

    @property
    def out(self) -> Path:
        return self.run.export_dir

    @property
    def log(self) -> Path:
        return self.out / "llama.log"

    def final(self, kind: str) -> Path:
        return self.out / f"{self.recipe.name}-{kind}.gguf"

    def partial(self, path: Path) -> Path:
        """Until verified, everything lives under .partial names: a killed export leaves nothing
        that looks finished, and the next export deletes the leftovers."""
        return path.with_name(f".{path.name}.partial")

    @property
    def sixteen_tmp(self) -> Path:
        return self.partial(self.final(self.sixteen_kind))

    @cached_property
    def heldout_sequences(self) -> list[list[int]]:
        """The held-out conversations verification compares logits on (the last turn as trained)."""
        return [self.prep.renderer.final_turn(e)[1].input_ids for e in self.prep.splits.heldout[:VERIFY_PROMPTS]]

    def sixteen_logits(self) -> np.ndarray:
        """The 16-bit file's logits on the held-out conversations, computed once: the choice between
        the calibrated and the plain quantization and the verification both compare against them."""
        if self._sixteen_logits is None:
            self._sixteen_logits = file_logits(self.sixteen_tmp, self.heldout_sequences,
                                               self.out / ".sixteen-logits.npy.partial", self.log)
        return self._sixteen_logits

    def drop_scratch(self) -> None:
        self._sixteen_logits = None
        (self.out / ".sixteen-logits.npy.partial").unlink(missing_ok=True)


def served_template(family: Family, template_kwargs: dict) -> str:
    """The official template with the trained mode pinned, so a runtime that renders the GGUF's
    own Jinja template (Ollama ≥ 0.30 may prefer it over TEMPLATE) produces the trained format."""
    pins = "".join(f"{{%- set {k} = {str(v).lower()} %}}\n" for k, v in template_kwargs.items())
    return pins + family.read_template()


def prepared_for_export(run: RunDir, recipe: Recipe, info: AdapterInfo) -> Prepared:
    """The run's data rendered as training rendered it: the adapter's own tokenizer, the trained
    template mode, the splits read once (for calibration, verification and --quant auto alike)."""
    from transformers import AutoTokenizer

    from finetune.data import load_splits
    from finetune.render import Renderer

    tokenizer = AutoTokenizer.from_pretrained(run.adapter)
    template, where = training_template(recipe, family_named(info.family))
    renderer = Renderer(tokenizer, template, family_named(info.family).read_template(), info.template_kwargs, where)
    return Prepared(info.base(), tokenizer, template, info.template_kwargs, load_splits(recipe), renderer)


def calibration_sequences(recipe: Recipe, prep: Prepared, budget: int) -> list[list[int]]:
    """The run's training conversations as the model saw them (served prompt, then the answer;
    over-long rows cut or left out by training's own rule), in a fixed shuffled order, until
    `budget` tokens: what the shipped model will be asked."""
    import random

    from finetune.render import apply_too_long

    examples = list(prep.splits.train)
    random.Random(recipe.train.seed).shuffle(examples)
    sequences, tokens = [], 0
    bos = prep.tokenizer.bos_token_id
    for example in examples:
        for row in prep.renderer.rows(example):
            row, _ = apply_too_long(row, recipe.data.max_length, recipe.data.too_long, bos)
            if row is None:  # dropped, as training dropped it
                continue
            sequences.append(row.input_ids[:budget - tokens])
            tokens += len(sequences[-1])
            if tokens >= budget:
                return sequences
    return sequences


def open_export(run: RunDir, quant: str, verify: bool, hf: bool, calibrated: bool, progress) -> ExportJob:
    """Read the run and check everything that can be checked before any work: the architecture,
    the config, the adapter against the base, the disk."""
    from finetune.preflight import preflight_export

    info = read_adapter_info(run)
    recipe = load_recipe(run.recipe)
    arch = arch_for(info.gguf_arch)  # unknown architectures fail here, before any work
    base_dir = local_snapshot(info.base_path, recipe.model.revision)
    cfg = read_config(base_dir)
    arch.check(cfg)  # a config ft cannot convert faithfully: refused before any work
    ckpt = Checkpoint.open(base_dir)
    adapter = Adapter(run.adapter)
    adapter.check(ckpt, base_dir)
    # logits files alive at once: the reference's (verification) and the 16-bit file's (verification,
    # and the choice between a calibrated and a plain quantization)
    chooses_calibration = calibrated and quant not in (*SIXTEEN_BIT, *UNCALIBRATED)
    logits_files = int(verify) + int(verify or chooses_calibration)
    preflight = preflight_export(base_dir, run.export_dir, quant, hf,
                                 logits_files * verify_logits_bytes(recipe.data.max_length, cfg["vocab_size"]))
    run.export_dir.mkdir(parents=True, exist_ok=True)
    for stale in run.export_dir.glob(".*.partial"):  # left by a killed export
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    report = ExportReport(run=str(run.root), quant=quant, base=str(base_dir), arch=arch.name, preflight=preflight)
    return ExportJob(run, recipe, info, family_named(info.family), arch, base_dir, cfg, ckpt, adapter,
                     prepared_for_export(run, recipe, info), report, progress,
                     sixteen_kind="bf16" if quant == "bf16" else "f16")


def convert(job: ExportJob) -> None:
    """Merge the adapter tensor by tensor and write the 16-bit GGUF."""
    job.progress(f"merging {len(job.adapter.deltas)} LoRA weights into {job.base_dir.name} and writing "
                 f"{job.sixteen_kind} GGUF")
    t0 = time.monotonic()
    family, tokenizer = job.family, job.prep.tokenizer
    summary = write_gguf(
        job.sixteen_tmp, job.arch, job.cfg, job.ckpt, job.adapter, job.sixteen_kind,
        lambda w: add_vocab(w, tokenizer, job.run.adapter, family.gguf_pre, family.end_of_turn[0],
                            job.cfg["vocab_size"], served_template(family, job.info.template_kwargs)),
        {"name": job.recipe.name, "license": job.info.license})
    job.report.convert = ConvertRecord(**summary, seconds=round(time.monotonic() - t0, 2))


def calibrate(job: ExportJob):
    """The importance matrix of the 16-bit file on the training conversations."""
    from export import imatrix

    sequences = calibration_sequences(job.recipe, job.prep, job.recipe.export.calibration_tokens)
    job.progress(f"calibrating: importance of every weight on {sum(map(len, sequences)):,} tokens of "
                 f"{len(sequences)} training conversations")
    t0 = time.monotonic()
    importance = imatrix.collect(job.sixteen_tmp, sequences, job.log)
    imatrix.check_covers(importance, imatrix.quantizable_weights(job.sixteen_tmp))
    _, silent = imatrix.quantizer_vectors(importance)
    job.report.imatrix = ImatrixRecord(tokens=importance.tokens, conversations=importance.sequences,
                                       tensors=len(importance.sums), silent_uncalibrated=silent,
                                       seconds=round(time.monotonic() - t0, 2))
    imatrix.write_imatrix_gguf(job.partial(job.out / "imatrix.gguf"), importance,
                               f"{job.run.root.name} training conversations")
    return importance


def kl_from_16bit(job: ExportJob, files: dict[str, Path]) -> dict[str, float]:
    """Mean KL of each file's next-token distribution from the 16-bit file's, on the held-out
    conversations."""
    from export.llama import GGUFModel

    sequences = job.heldout_sequences
    kl = {}
    for label, path in files.items():
        with GGUFModel(path, max(map(len, sequences)) + 16, job.log) as model:
            kl[label] = round(float(logit_parity(job.sixteen_logits(), model, sequences)["kl_mean"]), 6)
    return kl


def quantize_step(job: ExportJob, quant: str, calibrated: bool, choose_quant) -> tuple[str, Path]:
    """Quantize the 16-bit file; returns (the shipped type, its .partial file)."""
    from export.llama import native_log

    importance = calibrate(job) if calibrated and quant not in UNCALIBRATED else None

    def quantize_to(candidate: str, target: Path) -> None:
        with native_log(job.log):
            quantize(job.sixteen_tmp, target, candidate,
                     importance=importance if candidate not in UNCALIBRATED else None)

    t0 = time.monotonic()
    if quant == "auto":
        quant, chosen, job.report.auto = choose_quant(job.prep)(job.sixteen_tmp, quantize_to)
        shipped_tmp = job.partial(job.final(quant))
        os.replace(chosen, shipped_tmp)
        job.report.quant = quant
    else:
        job.progress(f"quantizing to {quant} with llama.cpp" + (", calibrated" if importance else ""))
        shipped_tmp = job.partial(job.final(quant))
        quantize_to(quant, shipped_tmp)
        if importance is not None:
            ship_the_closer(job, quant, shipped_tmp)
    job.report.quantize_seconds = round(time.monotonic() - t0, 2)
    return quant, shipped_tmp


def ship_the_closer(job: ExportJob, quant: str, calibrated_tmp: Path) -> None:
    """Calibration is not always better: on a 12-step SmolLM2 fine-tune its q4_k_m was further from
    the 16-bit file (KL 0.071) than without it (0.059). Both are made and the closer one ships
    (tests/test_real_model.py)."""
    from export.llama import native_log

    plain_tmp = job.partial(job.out / f"{job.recipe.name}-{quant}-uncalibrated.gguf")
    with native_log(job.log):
        quantize(job.sixteen_tmp, plain_tmp, quant)
    kl = kl_from_16bit(job, {"calibrated": calibrated_tmp, "uncalibrated": plain_tmp})
    record = job.report.imatrix
    record.kl_vs_16bit, record.used = kl, kl["calibrated"] <= kl["uncalibrated"]
    if record.used:
        plain_tmp.unlink()
        return
    job.progress(f"calibration moved {quant} further from the 16-bit file (KL {kl['calibrated']:.4f} "
                 f"against {kl['uncalibrated']:.4f}): shipping it uncalibrated")
    os.replace(plain_tmp, calibrated_tmp)
    job.partial(job.out / "imatrix.gguf").unlink()


def verify_step(job: ExportJob, quant: str, shipped_tmp: Path) -> None:
    """Verify the shipped file; a failure keeps it as <name>-<quant>.FAILED.gguf and raises."""
    job.progress("verifying: tokenizer parity, logit parity, stops")
    result = run_verification(job, shipped_tmp)
    write_json(job.out / "verify.json", {"passed": result.passed, "failures": result.failures, **result.checks})
    job.report.verify = VerifyOutcome(passed=result.passed, failures=result.failures)
    if not result.passed:
        failed_path = job.out / f"{job.recipe.name}-{quant}.FAILED.gguf"
        os.replace(shipped_tmp, failed_path)
        job.sixteen_tmp.unlink(missing_ok=True)
        job.partial(job.out / "imatrix.gguf").unlink(missing_ok=True)
        raise VerifyFailed(result.failures, failed_path)


def finalize(job: ExportJob, quant: str, shipped_tmp: Path, keep_f16: bool, hf: bool, renderer: bool) -> None:
    """Rename the verified files into place, write the Modelfile (and --format hf's folder)."""
    shipped = job.final(quant)
    os.replace(shipped_tmp, shipped)
    imatrix_tmp = job.partial(job.out / "imatrix.gguf")
    if imatrix_tmp.is_file():
        os.replace(imatrix_tmp, job.out / "imatrix.gguf")
    if quant not in SIXTEEN_BIT:
        if keep_f16:
            os.replace(job.sixteen_tmp, job.final(job.sixteen_kind))
        else:
            job.sixteen_tmp.unlink()
    recipe = job.recipe
    atomic_write_text(job.out / "Modelfile", modelfile(
        shipped.name, job.family, recipe.data.system_prompt, recipe.export.num_ctx, recipe.export.temperature,
        recipe.export.top_p, job.info.license, renderer=renderer))
    if hf:
        from export.hf import write_hf

        job.progress("writing merged safetensors (--format hf)")
        job.report.hf = write_hf(job.out / "hf", job.ckpt, job.adapter, job.base_dir, job.run.adapter)


def export_run(run: RunDir, quant: str, keep_f16: bool = False, verify: bool = True, hf: bool = False,
               renderer: bool = False, progress=print, calibrated: bool = True, choose_quant=None) -> ExportReport:
    """open → convert → (calibrate →) quantize → verify → finalize. `quant` "auto" needs
    `choose_quant(prep)` returning `choose(sixteen_path, quantize_to) -> (quant, path, report)`
    (eval/quant_choice.py: it scores candidates on the held-out set; export cannot import eval)."""
    started = time.monotonic()
    return_freed_memory_to_the_os()
    job = open_export(run, quant, verify, hf, calibrated, progress)
    (job.out / "imatrix.gguf").unlink(missing_ok=True)  # a previous export's; this one's comes with its file
    (job.out / f"{job.recipe.name}-{quant}.FAILED.gguf").unlink(missing_ok=True)
    try:
        convert(job)
        shipped_tmp = job.sixteen_tmp
        if quant not in SIXTEEN_BIT:
            quant, shipped_tmp = quantize_step(job, quant, calibrated, choose_quant)
        if verify:
            verify_step(job, quant, shipped_tmp)
    finally:
        job.drop_scratch()
    finalize(job, quant, shipped_tmp, keep_f16, hf, renderer)
    job.report.files = {p.name: p.stat().st_size for p in sorted(job.out.iterdir()) if p.is_file()}
    job.report.seconds = round(time.monotonic() - started, 2)
    job.report.peak_rss_mib = round(peak_rss_mib(), 1)
    write_export_report(run, job.report)
    return job.report


def run_verification(job: ExportJob, shipped: Path):
    from export.reference import reference_logits

    heldout = job.prep.splits.heldout[:VERIFY_PROMPTS]
    renderer, tokenizer = job.prep.renderer, job.prep.tokenizer
    prompt_texts = [renderer.served_prompt(e.messages[:-1]) for e in heldout]
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in prompt_texts]
    stop_ids = {tokenizer.convert_tokens_to_ids(t) for t in job.family.end_of_turn}
    specials = [t for t in tokenizer.all_special_tokens] + list(job.family.end_of_turn)
    # The fine-tuned model as transformers + peft compute it, one layer in memory at a time; its
    # logits go to a file (file-backed pages, not the process's anonymous memory).
    logits_file = job.out / ".reference-logits.npy.partial"
    try:
        reference = reference_logits(job.base_dir, job.run.adapter, job.heldout_sequences, logits_file)
        return verify_mod.verify(
            tokenizer=tokenizer, reference=reference, sequences=job.heldout_sequences, prompts=prompts,
            prompt_texts=prompt_texts, stop_ids=stop_ids, specials=specials, sixteen_bit=job.sixteen_tmp,
            quantized=shipped, max_new_tokens=job.recipe.eval.max_new_tokens, log=job.log,
            sixteen_bit_logits=job.sixteen_logits())
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
