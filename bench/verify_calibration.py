"""Export verification, calibrated on a real model: what faithful quantized files of a real
fine-tune score, and what corrupted ones score, on the checks `ft export` applies to the shipped file.

    python -m bench.verify_calibration [--run RUN] [--prompts 32]

RUN is a trained run of a real base (default: recipes/smollm2-support.yaml, trained first if no run
is given, ~12 minutes on 2 cores). Every file is scored against the fine-tuned model (transformers
+ peft, streamed, as verification computes it) and against ft's 16-bit file, on held-out
conversations (top-1 agreement on all positions and on decisive ones, mean KL), and by its clean-stop
rate on held-out prompts:

  faithful   ft's f16; llama.cpp's q8_0, q6_k, q5_k_m, q4_k_m of it (what `ft export` ships)
  corrupted  q4_k_m of a 16-bit file with two middle layers swapped; with the rope base a tenth of
             the model's; the base model's own q4_k_m shipped in place of the fine-tune's

and judged by export/verify.py's bounds, so the table shows the margin on each side.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, machine, table, write_result
from export.verify import BOUNDS, Verification, check_logits, check_structure, logit_parity, stops, structure

CORRUPTED_LAYERS = (14, 15)  # of SmolLM2's 30: two adjacent middle layers


def train_default_run(work: Path) -> Path:
    from finetune.recipe import load_recipe
    from finetune.run import RunDir
    from finetune.train.runner import train

    run = RunDir(work / "smollm2-support")
    train(load_recipe(ROOT / "recipes" / "smollm2-support.yaml", ["eval.after_train=false"]), run)
    return run.root


class Subject:
    """What a run's export needs: the base checkpoint, the adapter, the tokenizer, the prompts."""

    def __init__(self, run_root: Path, prompts: int):
        from transformers import AutoTokenizer

        from export.checkpoint import Checkpoint, local_snapshot, read_config
        from export.merge import Adapter
        from export.runner import family_named, read_adapter_info, served_template
        from finetune.data import load_splits
        from finetune.recipe import load_recipe
        from finetune.render import Renderer
        from finetune.run import RunDir
        from finetune.loading import training_template

        self.run = RunDir(run_root)
        self.info = read_adapter_info(self.run)
        self.recipe = load_recipe(self.run.recipe)
        self.family = family_named(self.info.family)
        self.base_dir = local_snapshot(self.info.base_path, self.recipe.model.revision)
        self.cfg = read_config(self.base_dir)
        self.ckpt = Checkpoint.open(self.base_dir)
        self.adapter = Adapter(self.run.adapter)
        self.tokenizer = AutoTokenizer.from_pretrained(self.run.adapter)
        kwargs = self.info.template_kwargs
        self.served = served_template(self.family, kwargs)
        template, where = training_template(self.recipe, self.family)
        renderer = Renderer(self.tokenizer, template, self.family.read_template(), kwargs, where)
        heldout = load_splits(self.recipe).heldout[:prompts]
        self.sequences = [renderer.final_turn(e)[1].input_ids for e in heldout]
        self.prompts = [self.tokenizer.encode(renderer.served_prompt(e.messages[:-1]), add_special_tokens=False)
                        for e in heldout]
        self.stop_ids = {self.tokenizer.convert_tokens_to_ids(t) for t in self.family.end_of_turn}

    def write_16bit(self, path: Path, arch, cfg: dict, adapter) -> None:
        from export.gguf_file import write_gguf
        from export.vocab import add_vocab

        write_gguf(path, arch, cfg, self.ckpt, adapter, "f16",
                   lambda w: add_vocab(w, self.tokenizer, self.run.adapter, self.family.gguf_pre,
                                       self.family.end_of_turn[0], cfg["vocab_size"], self.served),
                   {"name": self.recipe.name, "license": self.info.license})  # as ft export


def swapped_layers(arch, a: int, b: int):
    """The architecture's converter with layers a and b written under each other's names."""
    class Swapped(type(arch)):
        def plan(self, names, shapes, cfg):
            plans = super().plan(names, shapes, cfg)
            for p in plans:
                for x, y in ((a, b), (b, a)):
                    if p.gguf_name.startswith(f"blk.{x}."):
                        p.gguf_name = f"blk.{y}." + p.gguf_name[len(f"blk.{x}."):]
                        break
            return plans
    return Swapped()


def tenth_rope_base(cfg: dict) -> dict:
    wrong = copy.deepcopy(cfg)
    params = wrong.get("rope_parameters") or {}
    if params.get("rope_theta") is not None:
        params["rope_theta"] = params["rope_theta"] / 10
    if wrong.get("rope_theta") is not None:
        wrong["rope_theta"] = wrong["rope_theta"] / 10
    return wrong


def verdict(vs_tuned: dict, built: dict, stop_rate: float, tuned_stop_rate: float) -> str:
    """What `ft export` would say of this file as the shipped one (export/verify.py's own checks)."""
    v = Verification()
    check_logits(v, "logits", vs_tuned, BOUNDS.quantized)
    check_structure(v, built)
    failed = sorted({f.split(":")[0] + (" (metadata)" if "metadata" in f else "") for f in v.failures})
    if stop_rate < tuned_stop_rate - BOUNDS.stop_rate_drop_max:
        failed.append("stops")
    return "fails: " + ", ".join(failed) if failed else "passes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a trained run of a real base (default: train smollm2-support)")
    parser.add_argument("--prompts", type=int, default=32, help="held-out conversations scored")
    args = parser.parse_args()

    from export.arches import arch_for
    from export.llama import GGUFModel, native_log
    from export.quantize import quantize
    from export.reference import reference_logits

    work = Path(tempfile.mkdtemp(prefix="ft-bench-verify-"))
    run_root = args.run or train_default_run(work)
    subject = Subject(run_root, args.prompts)
    arch = arch_for(subject.info.gguf_arch)
    started = time.monotonic()
    files: dict[str, Path] = {}

    f16 = work / "f16.gguf"
    subject.write_16bit(f16, arch, subject.cfg, subject.adapter)
    files["ft f16 (the verified intermediate)"] = f16
    for quant in ("q8_0", "q6_k", "q5_k_m", "q4_k_m"):
        files[f"{quant}" + (" (what ft export ships)" if quant == "q4_k_m" else "")] = work / f"{quant}.gguf"
        with native_log(work / "llama.log"):
            quantize(f16, work / f"{quant}.gguf", quant)
    corrupted = {
        f"q4_k_m, layers {CORRUPTED_LAYERS[0]} and {CORRUPTED_LAYERS[1]} swapped":
            (swapped_layers(arch, *CORRUPTED_LAYERS), subject.cfg, subject.adapter),
        "q4_k_m, rope base a tenth of the model's": (arch, tenth_rope_base(subject.cfg), subject.adapter),
        "q4_k_m of the base model (not fine-tuned)": (arch, subject.cfg, None),
    }
    for name, (conv, cfg, adapter) in corrupted.items():
        source = work / f"{len(files)}-f16.gguf"
        subject.write_16bit(source, conv, cfg, adapter)
        files[name] = work / f"{len(files)}-q4_k_m.gguf"
        with native_log(work / "llama.log"):
            quantize(source, files[name], "q4_k_m")
        source.unlink()

    reference = reference_logits(subject.base_dir, subject.run.adapter, subject.sequences, work / "reference.npy")
    n_ctx = max(len(s) for s in subject.sequences + subject.prompts) + subject.recipe.eval.max_new_tokens + 16
    with GGUFModel(f16, n_ctx) as model:  # the 16-bit file's logits, stacked like the reference's
        sixteen = np.concatenate([model.logits(ids)[:, : reference.shape[1]] for ids in subject.sequences])
    results, tuned_stop_rate = {}, None
    for name, path in files.items():
        with GGUFModel(path, n_ctx) as model:
            vs_tuned = logit_parity(reference, model, subject.sequences)
            vs_sixteen = logit_parity(sixteen, model, subject.sequences)
            stopped = stops(model, subject.tokenizer, subject.prompts, subject.stop_ids,
                            subject.recipe.eval.max_new_tokens)
        if tuned_stop_rate is None:
            tuned_stop_rate = stopped["stop_rate"]  # the 16-bit file's: the fine-tuned model's rate
        built = structure(f16, path)
        worst = max(built["worst_relative_error_by_type"].values())
        results[name] = {"size_mib": round(path.stat().st_size / 2**20, 1), "vs_fine_tuned": vs_tuned,
                         "vs_16bit": vs_sixteen, "stop_rate": stopped["stop_rate"], "structure": built,
                         "verdict": verdict(vs_tuned, built, stopped["stop_rate"], tuned_stop_rate)}
        results[name]["worst_tensor_error"] = round(worst, 4)

    def cells(r: dict) -> list:
        return [f"{r['top1_agreement']:.3f}", f"{r['top1_agreement_decisive']:.3f} ({r['decisive_positions']})",
                f"{r['kl_mean']:.4f}"]

    rows = [[name, r["size_mib"], *cells(r["vs_fine_tuned"]), *cells(r["vs_16bit"]), f"{r['stop_rate']:.2f}",
             f"{r['worst_tensor_error']:.3f}" + (" + metadata" if r["structure"]["metadata_differs"] else ""),
             r["verdict"]] for name, r in results.items()]
    print(table(["file", "MiB", "top-1 vs tuned", "decisive top-1 (n)", "KL vs tuned", "top-1 vs f16",
                 "decisive vs f16 (n)", "KL vs f16", "stops", "worst tensor vs f16", "ft export says"], rows))
    print(f"bounds on the shipped file: {BOUNDS.quantized}, stop-rate drop ≤ {BOUNDS.stop_rate_drop_max}")
    write_result("verify_calibration", {
        "machine": machine(), "run": str(run_root), "base": subject.info.base_model,
        "base_weights": subject.info.base_weights, "conversations": len(subject.sequences),
        "positions": int(reference.shape[0]), "bounds": BOUNDS, "files": results,
        "seconds": round(time.monotonic() - started, 1)})
    print(json.dumps({"work": str(work)}))


if __name__ == "__main__":
    main()
