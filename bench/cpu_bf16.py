"""train.cpu_bf16 on the README's demo: the same run in fp32 and under bf16 autocast.

    python -m bench.cpu_bf16 [--steps 30]

Trains recipes/smollm2-support.yaml twice, one process at a time and nothing else running, same
seed and steps, `train.cpu_bf16` false then true, without the evaluation after training. Printed:
the CPU's bf16 support (torch's own checks), training seconds without the step-0 held-out loss,
real tokens per second, the held-out loss each adapter reaches (the Trainer's evaluation, fp32 in
both), and the speed ratio.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.common import ROOT, machine, measured, python, table, write_result
from finetune.run import RunDir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    import torch

    work = Path(tempfile.mkdtemp(prefix="ft-bench-cpu-bf16-"))
    flags = {"avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()), "amx": bool(torch.cpu._is_amx_tile_supported())}
    results = {}
    for bf16 in (False, True):
        out = work / ("bf16" if bf16 else "fp32")
        m = measured(python("-m", "finetune", "train", str(ROOT / "recipes" / "smollm2-support.yaml"), "--output",
                            str(out), "--set", f"train.max_steps={args.steps}", "--set", "eval.after_train=false",
                            "--set", f"train.cpu_bf16={str(bf16).lower()}"))
        run = RunDir(out)
        summary = run.read_manifest().summary
        evaluations = [r["eval_runtime"] for r in run.read_metrics() if "eval_runtime" in r]
        seconds = summary.train_runtime_s - sum(evaluations[:-1])  # the step-0 held-out loss is not training
        tokens = run.trained_tokens()
        results["bf16" if bf16 else "fp32"] = dict(train_s=round(seconds, 1), tokens=int(tokens),
                                                   tokens_per_s=round(tokens / seconds, 1),
                                                   heldout_loss=round(summary.heldout_loss_end, 4),
                                                   peak_rss_mib=round(m["peak_rss_mib"]))
    fp32, bf16 = results["fp32"], results["bf16"]
    ratio = bf16["tokens_per_s"] / fp32["tokens_per_s"]
    print(machine())
    print(f"CPU bf16: {flags}; demo, {args.steps} steps")
    print(table(["", "train s", "real tokens", "tokens/s", "held-out loss", "peak RSS MiB"],
                [[k, v["train_s"], v["tokens"], v["tokens_per_s"], v["heldout_loss"], v["peak_rss_mib"]]
                 for k, v in results.items()]))
    print(f"bf16 autocast / fp32: {ratio:.2f}× tokens/s; held-out loss {bf16['heldout_loss'] - fp32['heldout_loss']:+.4f}")
    path = write_result("cpu_bf16", {"machine": machine(), "cpu": flags, "steps": args.steps, "results": results,
                                     "ratio": ratio})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
