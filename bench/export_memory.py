"""Export memory: ft's streaming merge → GGUF → Q4_K_M against the usual path, on a checkpoint of
several GB in the real Qwen3.5 layout.

    python -m bench.export_memory [--layers 24] [--hidden 2048]

The checkpoint is random bf16 weights written shard by shard (never whole in memory) with the
tiny twin's tokenizer; the adapter is a rank-16 LoRA with non-zero A and B on every target the
Qwen3.5 family trains. The usual path is what the Unsloth / PEFT / llama.cpp guides describe,
each step in its own process: peft `merge_and_unload()` + `save_pretrained()`, llama.cpp's
`convert_hf_to_gguf.py --outtype f16 --no-mtp` (the synthetic checkpoint has no MTP layers), then quantization to Q4_K_M (the same
llama_model_quantize that `llama-quantize` calls). The converter comes from the
llama-cpp-python source release matching the installed version, fetched from PyPI once into
$FT_CACHE/bench. ft runs `ft export` twice: with its default verification (tokenizer, logit parity
of both files against a transformers + peft reference streamed one layer at a time, stops), whose
anonymous memory must stay under 25% of the bf16 checkpoint + 1.5 GiB, and with --no-verify, the
like-for-like comparison with the usual path (which verifies nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.common import (ROOT, llama_cpp_converter, machine, measured, python, table,
                          write_random_checkpoint, write_result)

SHARD_BYTES = 1 << 30


def synthetic_base(folder: Path, layers: int, hidden: int) -> int:
    """A Qwen3.5 checkpoint with the twin's tokenizer; returns its size in bytes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune.twins import ensure_twin

    twin = ensure_twin("tiny-qwen3.5")
    config = AutoConfig.from_pretrained(twin)
    heads = hidden // 256
    config.update(dict(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                       layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)],
                       num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=256,
                       linear_num_key_heads=hidden // 128, linear_num_value_heads=2 * hidden // 128,
                       linear_key_head_dim=128, linear_value_head_dim=128))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    folder.mkdir(parents=True)
    for name in os.listdir(twin):
        if name.startswith("tokenizer") or name.endswith(".jinja") or name == "generation_config.json":
            shutil.copy(twin / name, folder / name)
    config.save_pretrained(folder)
    return write_random_checkpoint(folder, shapes, SHARD_BYTES, norms=0.0)  # Qwen3.5 norms: offsets from 1


def synthetic_run(work: Path, base: Path) -> Path:
    """A finished ft run on the tiny twin, re-pointed at the big base with a LoRA of its shapes."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    run = work / "run"
    recipe = ROOT / "recipes" / "tiny-support.yaml"
    subprocess.run(python("-m", "finetune", "train", str(recipe), "--output", str(run), "--set", "train.max_steps=1",
                          "--set", "data.limit=8", "--set", "eval.after_train=false", "--set", "train.rehearsal=0"), check=True, cwd=ROOT,
                   capture_output=True)
    info = json.loads((run / "adapter" / "ft_adapter.json").read_text())
    info.update(base_path=str(base), base_model=str(base))
    (run / "adapter" / "ft_adapter.json").write_text(json.dumps(info))
    for path in (run / "recipe.yaml", run / "adapter" / "recipe.yaml"):
        path.write_text(path.read_text().replace("base: tiny-qwen3.5", f"base: {base}"))
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    shapes = {}
    for shard in sorted(set(index.values())):
        with safe_open(str(base / shard), "pt") as f:
            for key in f.keys():
                if key.endswith(".weight") and any(f".{t}.weight" in key for t in info["lora_targets"]):
                    shapes[key] = f.get_slice(key).get_shape()
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for key, (out_features, in_features) in shapes.items():
        stem = "base_model.model." + key.removesuffix(".weight")
        tensors[f"{stem}.lora_A.weight"] = torch.randn(16, in_features, generator=generator) * 0.01
        tensors[f"{stem}.lora_B.weight"] = torch.randn(out_features, 16, generator=generator) * 0.01
    save_file(tensors, str(run / "adapter" / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    return run


USUAL_MERGE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
AutoTokenizer.from_pretrained(adapter).save_pretrained(out)
"""

# The twin's tokenizer is not one llama.cpp has a hash for; name its pre-tokenizer as ft does.
USUAL_CONVERT = """
import runpy, sys
from pathlib import Path
script = Path(sys.argv[1]); sys.argv = sys.argv[1:]
sys.path[:0] = [str(script.parent), str(script.parent / "gguf-py")]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen35"
runpy.run_path(str(script), run_name="__main__")
"""

USUAL_QUANTIZE = """
import sys
from export.quantize import quantize
quantize(sys.argv[1], sys.argv[2], "q4_k_m")
"""


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()

    converter = llama_cpp_converter()
    work = Path(tempfile.mkdtemp(prefix="ft-bench-export-", dir=os.environ.get("FT_BENCH_DIR")))
    base = work / "base"
    checkpoint = synthetic_base(base, args.layers, args.hidden)
    run = synthetic_run(work, base)
    print(f"machine: {machine()}\ncheckpoint: {checkpoint / 2**30:.2f} GiB bf16 Qwen3.5 ({args.layers} layers, "
          f"hidden {args.hidden}), LoRA r=16 on every target\n")

    verified = measured(python("-m", "finetune", "export", str(run), "--quant", "q4_k_m"))
    verified_report = json.loads((run / "export" / "export.json").read_text())
    shutil.rmtree(run / "export")
    # --keep-f16 so the 16-bit intermediate ft writes (and normally deletes) is counted
    ft = measured(python("-m", "finetune", "export", str(run), "--quant", "q4_k_m", "--no-verify", "--keep-f16"))
    ft_written = size(run / "export")
    ft_report = json.loads((run / "export" / "export.json").read_text())

    hf, f16, q4 = work / "usual-hf", work / "usual-f16.gguf", work / "usual-q4_k_m.gguf"
    steps = {
        "merge_and_unload + save_pretrained": measured(python("-c", USUAL_MERGE, str(base), str(run / "adapter"), str(hf))),
        "convert_hf_to_gguf --outtype f16": measured(python("-c", USUAL_CONVERT, str(converter), str(hf),
                                                            "--outtype", "f16", "--no-mtp", "--outfile", str(f16))),
        "quantize q4_k_m": measured(python("-c", USUAL_QUANTIZE, str(f16), str(q4))),
    }
    usual_written = size(hf) + size(f16) + size(q4)
    usual_peak = max(s["peak_rss_mib"] for s in steps.values())
    usual_wall = sum(s["wall_s"] for s in steps.values())
    rows = [[f"usual: {name}", s["wall_s"], s["peak_rss_mib"], ""] for name, s in steps.items()]
    rows.append(["usual path, total", usual_wall, usual_peak, f"{usual_written / 2**30:.2f} GiB"])
    rows.append(["ft export --no-verify", ft["wall_s"], ft["peak_rss_mib"], f"{ft_written / 2**30:.2f} GiB"])
    rows.append(["  of which merge + f16 GGUF", ft_report["convert"]["seconds"], "", ""])
    rows.append(["  of which quantize q4_k_m", ft_report["quantize_seconds"], "", ""])
    rows.append(["ft export (verified, the default)", verified["wall_s"], verified["peak_rss_mib"], ""])
    print(table(["export", "wall s", "peak RSS MiB", "bytes written"], rows))
    bound = 0.25 * checkpoint / 2**20 + 1536
    verdict = "within" if verified["peak_anon_mib"] <= bound else "OVER"
    print(f"\nft export with verification: peak anonymous memory {verified['peak_anon_mib']:,.0f} MiB, "
          f"{verdict} the bound of 25% of the checkpoint + 1.5 GiB = {bound:,.0f} MiB "
          f"(peak RSS with mapped files {verified['peak_rss_mib']:,.0f} MiB); verification "
          f"{'passed' if verified_report['verify']['passed'] else 'FAILED'}")
    ratio_rss, ratio_wall = usual_peak / ft["peak_rss_mib"], ft["wall_s"] / usual_wall
    share = ft["peak_rss_mib"] * 2**20 / checkpoint
    print(f"\nft peak RSS = {share:.1%} of the checkpoint, {ratio_rss:.1f}x below the usual path; "
          f"ft wall time = {ratio_wall:.2f}x the usual path's")
    path = write_result("export_memory", {
        "machine": machine(), "checkpoint_bytes": checkpoint, "layers": args.layers, "hidden": args.hidden,
        "ft": {"wall_s": round(ft["wall_s"], 1), "peak_rss_mib": round(ft["peak_rss_mib"]), "bytes_written": ft_written,
               "merge_and_f16_s": ft_report["convert"]["seconds"], "quantize_s": ft_report["quantize_seconds"]},
        "usual": {"steps": {k: {"wall_s": round(v["wall_s"], 1), "peak_rss_mib": round(v["peak_rss_mib"])}
                            for k, v in steps.items()},
                  "wall_s": round(usual_wall, 1), "peak_rss_mib": round(usual_peak), "bytes_written": usual_written},
        "ft_peak_share_of_checkpoint": round(share, 3), "rss_ratio": round(ratio_rss, 2), "wall_ratio": round(ratio_wall, 3),
        "ft_verified": {"wall_s": round(verified["wall_s"], 1), "peak_rss_mib": round(verified["peak_rss_mib"]),
                        "peak_anon_mib": round(verified["peak_anon_mib"]), "anon_bound_mib": round(bound),
                        "within_bound": verified["peak_anon_mib"] <= bound,
                        "passed": verified_report["verify"]["passed"]}})
    print(f"written: {path}")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
