"""Full-size rehearsal: every ft command on a Qwen3.5-9B-shaped and an OLMo-3-7B-shaped checkpoint.

    python -m bench.full_size [--model qwen3.5-9b|olmo3-7b|both|qwen3.5-0.8b] [--layers N]

The checkpoints have the real configs, random bf16 weights and the hub layout (Qwen3.5: the
vision-language class with `text_config`, a vision tower and an MTP head; OLMo 3: YaRN as legacy
`rope_scaling`, a 4,096 sliding window on 3 of 4 layers), written shard by shard, never whole in
memory. The tokenizer is the family twin's, its embedding padded to the real vocabulary (248,320 /
100,278 rows: no public copy of the 248k Qwen3.5 tokenizer exists here). Then, each in its own
process and measured: `ft validate`, `ft train` (2 steps of short examples, CPU), `ft export --quant
q4_k_m` with verification, and `ft eval --gguf` on two examples. For each stage: wall time, peak RSS,
peak anonymous memory, and the disk high-water mark of the work folder next to what preflight
predicted. `--model qwen3.5-0.8b`: the smallest Qwen3.5 (tied embeddings, no lm_head tensor), trained
at recipes/laptop-qwen3.5-0.8b.yaml's batch, length and packing. `--layers` shrinks the depth (for a quick check of the script itself); the figures in
bench/RESULTS.md are from the real depth.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

from bench.common import ROOT, machine, measured, python, table, write_random_checkpoint, write_result
from export.record import read_export_report
from finetune.models import QWEN3_5_SHAPES
from finetune.run import RunDir

SHARD_BYTES = 2 << 30

QWEN35_9B = dict(  # Qwen/Qwen3.5-9B's published config.json (text_config)
    vocab_size=248320, hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=16,
    num_key_value_heads=4, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
    linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4, rms_norm_eps=1e-6,
    max_position_embeddings=262144, tie_word_embeddings=False, mtp_num_hidden_layers=1,
    rope_parameters=dict(rope_type="default", rope_theta=10_000_000.0, partial_rotary_factor=0.25,
                         mrope_section=[11, 11, 10], mrope_interleaved=True))
OLMO3_7B = dict(
    vocab_size=100278, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, rms_norm_eps=1e-6, max_position_embeddings=65536, tie_word_embeddings=False,
    sliding_window=4096, rope_theta=500_000.0,
    rope_scaling=dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=8192,
                      attention_factor=1.2079441541679836, beta_fast=32.0, beta_slow=1.0))
_SMALL = QWEN3_5_SHAPES["0.8B"]  # the smallest size, as the registry records its published config
QWEN35_0_8B = dict(QWEN35_9B, hidden_size=_SMALL.hidden, intermediate_size=_SMALL.intermediate,
                   num_hidden_layers=_SMALL.layers, num_attention_heads=_SMALL.heads,
                   num_key_value_heads=_SMALL.kv_heads, linear_num_value_heads=_SMALL.linear_value_heads,
                   tie_word_embeddings=_SMALL.tied_embeddings)


def write_checkpoint(folder: Path, twin_alias: str, text: dict, layers: int | None, text_only: bool = False) -> int:
    """The real config and layout with random weights; returns the bytes written. `text_only`:
    without Qwen3.5's vision tower and MTP head (what training reads; the config stays the hub's)."""
    import torch

    from finetune.twins import TWINS, ensure_twin, legacy_rope_config

    twin = ensure_twin(twin_alias)
    spec = TWINS[twin_alias]
    text = dict(text, num_hidden_layers=layers or text["num_hidden_layers"])
    n = text["num_hidden_layers"]
    other = "linear_attention" if "linear_num_key_heads" in text else "sliding_attention"
    # every 4th layer full attention, as published; a cut-down depth keeps its last layer full too
    text["layer_types"] = ["full_attention" if (i + 1) % 4 == 0 or i == n - 1 else other for i in range(n)]
    tokenizer_config = json.loads((twin / "config.json").read_text())
    tokenizer_config = tokenizer_config.get("text_config", tokenizer_config)
    ids = {k: tokenizer_config[k] for k in ("eos_token_id", "pad_token_id", "bos_token_id") if k in tokenizer_config}
    import transformers

    cls = getattr(transformers, spec.architecture)
    if spec.layout == "qwen3_5_hub":
        config = cls.config_class(text_config={**text, **ids},  # the real vision tower
                                  tie_word_embeddings=text["tie_word_embeddings"])
    else:
        config = cls.config_class(**text, **ids)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in cls(config).state_dict().items()}
    if text_only:
        shapes = {k: v for k, v in shapes.items() if not k.startswith("model.visual.")}
    if text["tie_word_embeddings"]:  # a tied checkpoint stores the embedding once, as the 0.8B does
        shapes = {k: v for k, v in shapes.items() if not k.endswith("lm_head.weight")}
    folder.mkdir(parents=True)
    for name in os.listdir(twin):
        if name.startswith("tokenizer") or name.endswith(".jinja") or name in ("generation_config.json", "special_tokens_map.json"):
            shutil.copy(twin / name, folder / name)
    config.save_pretrained(folder)
    norms = 0.0 if spec.family.name == "qwen3_5" else 1.0  # Qwen3.5 norms are offsets from 1
    write_random_checkpoint(folder, shapes, SHARD_BYTES, norms)
    if spec.layout == "qwen3_5_hub":
        if not text_only:  # the MTP head, in a shard of its own, as published
            add_mtp_shard(folder, text)
    else:
        legacy_rope_config(folder, text)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def add_mtp_shard(folder: Path, text: dict) -> None:
    from safetensors.torch import save_file

    from finetune.twins import mtp_head_tensors

    tensors = mtp_head_tensors(text)
    save_file(tensors, str(folder / "model-mtp.safetensors"), metadata={"format": "pt"})
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update({k: "model-mtp.safetensors" for k in tensors})
    index_path.write_text(json.dumps(index))


def recipe_for(work: Path, base: Path, name: str) -> Path:
    """tiny-support's data and settings, pointed at the big base, cut to what 2 cores can run."""
    text = (ROOT / "recipes" / "tiny-support.yaml").read_text()
    text = re.sub(r"base: \S+", f"base: {base}", text).replace("../datasets", str(ROOT / "datasets"))
    path = work / f"{name}.yaml"
    path.write_text(re.sub(r"^name: .*$", f"name: {name}", text, flags=re.M))
    return path


SETTINGS = ["data.limit=8", "data.heldout_max=8", "data.max_length=256", "data.too_long=drop",
            "train.max_steps=2", "train.batch_size=1", "train.save_steps=2", "train.logging_steps=1",
            "eval.max_examples=2", "eval.batch_size=2", "eval.max_new_tokens=4", "train.gradient_checkpointing=true",
            "train.rehearsal=0"]  # memory of training itself: no rehearsal generation on 2 cores
# the 0.8B trains at recipes/laptop-qwen3.5-0.8b.yaml's batch and length: its README estimate is
# measured at the settings it was made for (2 steps)
LAPTOP_SETTINGS = ["data.limit=16", "data.heldout_max=4", "data.max_length=512", "data.too_long=drop",
                   "train.max_steps=2", "train.batch_size=4", "train.grad_accum=2", "lora.r=16", "train.packing=false",
                   "train.save_steps=2", "train.logging_steps=1", "eval.max_examples=2", "eval.batch_size=2",
                   "eval.max_new_tokens=4", "train.gradient_checkpointing=true", "train.rehearsal=0"]
# model → (the twin whose tokenizer and layout it takes, its config, the settings it trains at)
MODELS = {"qwen3.5-9b": ("tiny-qwen3.5-hub", QWEN35_9B, SETTINGS), "olmo3-7b": ("tiny-olmo3-yarn", OLMO3_7B, SETTINGS),
          "qwen3.5-0.8b": ("tiny-qwen3.5-tied-hub", QWEN35_0_8B, LAPTOP_SETTINGS)}


class DiskWatch:
    """Bytes used under a folder, sampled every second: the high-water mark of a stage."""

    def __init__(self, folder: Path):
        self.folder, self.peak, self._stop = folder, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _used(self) -> int:
        return sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file()) if self.folder.exists() else 0

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._used())
            except OSError:
                pass
            time.sleep(1)

    def __enter__(self):
        self.start = self._used()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._used())


def predicted_disk(output: str) -> int | None:
    """The bytes preflight said the run and its export need (printed by ft train / ft validate)."""
    units = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    total = 0
    for number, unit in re.findall(r"disk at [^:]+: needs ([\d,.]+) (\w+)", output):
        total += float(number.replace(",", "")) * units[unit]
    return int(total) or None


def rehearse(model: str, work: Path, layers: int | None, start_at: str | None = None) -> dict:
    """Every stage in order; `start_at` picks up a work folder a stopped rehearsal left (its
    checkpoint and the stages before are reused, not measured again)."""
    twin_alias, config, settings = MODELS[model]
    base = work / f"{model}-base"
    t0 = time.monotonic()
    if start_at is None:
        size = write_checkpoint(base, twin_alias, config, layers)
        print(f"{model}: wrote {size / 2**30:.2f} GiB in {time.monotonic() - t0:.0f} s")
    else:
        size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    recipe = recipe_for(work, base, model)
    run = work / "runs" / model
    sets = [a for s in settings for a in ("--set", s)]
    stages = {}
    started = start_at is None
    for stage, args, watch in (
        ("ft validate", ["validate", str(recipe), *sets], work / "runs"),
        ("ft train", ["train", str(recipe), "--output", str(run), *sets], work / "runs"),
        ("ft export --quant q4_k_m", ["export", str(run), "--quant", "q4_k_m", "--keep-f16"], work / "runs"),
        ("ft eval --gguf", ["eval", str(run), "--gguf", "--set", "eval.max_examples=2"], work / "runs"),
    ):
        started = started or stage.startswith(start_at)
        if not started:
            continue
        if stage.startswith("ft export"):
            shutil.rmtree(run / "export", ignore_errors=True)
        with DiskWatch(watch) as disk:
            result = measured(python("-m", "finetune", *args), env={"FT_CACHE": os.environ.get("FT_CACHE", "")})
        stages[stage] = {"wall_s": round(result["wall_s"], 1), "peak_rss_mib": round(result["peak_rss_mib"]),
                         "peak_anon_mib": round(result["peak_anon_mib"]), "disk_peak_bytes": disk.peak - disk.start,
                         "predicted_disk_bytes": predicted_disk(result["output"])}
        print(f"  {stage}: {result['wall_s']:.0f} s, peak RSS {result['peak_rss_mib']:,.0f} MiB, "
              f"anonymous {result['peak_anon_mib']:,.0f} MiB", flush=True)
    # Attribution: llama.cpp's quantizer alone on the 16-bit file the export kept, with its own
    # default buffer (8 GiB: whole tensors, each converted to fp32 first, so its peak follows the
    # largest tensor, the embedding) and with the slabs ft passes (export/quantize.py).
    f16 = next((run / "export").glob("*-f16.gguf"))
    from export.quantize import QUANTIZE_BUFFER_BYTES

    for label, buffer in (("llama.cpp's default buffer", 8 << 30), ("ft's slabs", QUANTIZE_BUFFER_BYTES)):
        code = ("import sys; from export.quantize import quantize; from pathlib import Path; "
                "quantize(Path(sys.argv[1]), Path(sys.argv[2]), 'q4_k_m', buffer_bytes=int(sys.argv[3]))")
        result = measured(python("-c", code, str(f16), str(work / "quantize-alone.gguf"), str(buffer)))
        stages[f"llama.cpp quantize alone, {label} (attribution)"] = {
            "wall_s": round(result["wall_s"], 1), "peak_rss_mib": round(result["peak_rss_mib"]),
            "peak_anon_mib": round(result["peak_anon_mib"]), "disk_peak_bytes": 0, "predicted_disk_bytes": None}
        print(f"  llama.cpp quantize alone, {label}: {result['wall_s']:.0f} s, anonymous "
              f"{result['peak_anon_mib']:,.0f} MiB", flush=True)
    (work / "quantize-alone.gguf").unlink()
    f16.unlink()
    manifest = RunDir(run).read_manifest()
    verify = read_export_report(RunDir(run)).verify
    return {"checkpoint_bytes": size, "layers": layers or config["num_hidden_layers"], "stages": stages,
            "preflight": manifest.preflight, "verify_passed": verify.passed, "verify_failures": verify.failures}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=[*MODELS, "both"], default="both", help="both: the 9B and the 7B")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the real model (script check)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--resume", nargs=2, metavar=("WORK", "STAGE"),
                    help="continue a stopped rehearsal in WORK from STAGE (e.g. 'ft export'): one model")
    args = ap.parse_args()
    if args.resume:
        work = Path(args.resume[0])
    else:
        work = Path(tempfile.mkdtemp(prefix="ft-bench-full-", dir=os.environ.get("FT_BENCH_DIR")))
    print(f"machine: {machine()}\nwork folder: {work}\n")
    results = {}
    for model in (["qwen3.5-9b", "olmo3-7b"] if args.model == "both" else [args.model]):
        results[model] = rehearse(model, work, args.layers, args.resume[1] if args.resume else None)
        shutil.rmtree(work / f"{model}-base", ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work / "runs" / model, ignore_errors=True)
    rows = []
    for model, r in results.items():
        train_disk = r["stages"].get("ft train", {}).get("predicted_disk_bytes")
        actual = sum(s["disk_peak_bytes"] for name, s in r["stages"].items() if name != "ft validate")
        bound = (0.15 * r["checkpoint_bytes"] + 1.5 * 2**30) / 2**20
        for stage, s in r["stages"].items():
            rows.append([model, stage, s["wall_s"], s["peak_rss_mib"], s["peak_anon_mib"],
                         f"{s['disk_peak_bytes'] / 2**30:.2f}"])
        rows.append([model, "disk: preflight predicted / used", "", "", "",
                     f"{(train_disk or 0) / 2**30:.2f} / {actual / 2**30:.2f}"])
        rows.append([model, "export anonymous-memory bound (15% of checkpoint + 1.5 GiB)", "", "", round(bound), ""])
    print(table(["model", "stage", "wall s", "peak RSS MiB", "peak anon MiB", "disk GiB"], rows))
    name = "full_size" if args.model in ("both", "qwen3.5-9b", "olmo3-7b") else f"full_size_{args.model}"
    name += f"_{args.layers}_layers" if args.layers is not None else ""
    print(f"written: {write_result(name, {'machine': machine(), **results})}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
