"""train.rehearsal on the README's demo: the same run with and without it.

    python -m bench.rehearsal [--share 0.125] [--steps 60] [--benchmark-items 200] [--without RUN]

Trains recipes/smollm2-support.yaml twice (same seed, same steps), once with train.rehearsal 0 and
once with the share given, each followed by `ft eval` with ARC-Easy and PIQA from
../shared/data/general/ as general benchmarks (the first N items each). Printed: every job metric
and every general row of both runs with their paired intervals against the base, and whether each
job metric of the rehearsed run lies within the interval of the run without rehearsal (what
decides the default: rehearsal must not cost the job). `--without RUN`: a finished run without
rehearsal from an earlier call (same steps and benchmarks), instead of training it again.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.common import ROOT, SHARED, machine, measured, python, table, write_result


def rows_of(report: dict) -> dict[str, dict]:
    rows = {r["name"]: r for r in report["metrics"]}
    rows.update({r["key"]: r for r in (report["general"]["rows"] if report["general"] else [])})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--share", type=float, default=0.125)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--benchmark-items", type=int, default=200)
    ap.add_argument("--without", help="a finished run without rehearsal, from an earlier call")
    args = ap.parse_args()
    benchmarks = [SHARED / "data" / "general" / f"{name}.jsonl" for name in ("arc_easy", "piqa")]
    if not all(b.is_file() for b in benchmarks):
        raise SystemExit(f"needs {benchmarks} (../shared/data/general/)")
    work = Path(tempfile.mkdtemp(prefix="ft-bench-rehearsal-"))
    common = ["--set", f"train.max_steps={args.steps}",
              "--set", f"eval.general.benchmarks=[{','.join(str(b) for b in benchmarks)}]",
              "--set", f"eval.general.benchmark_max_items={args.benchmark_items}"]
    reports, walls = {}, {}
    for name, share in (("without", 0.0), ("with", args.share)):
        run = work / f"smollm2-support-{name}"
        if name == "without" and args.without:
            reports[name] = json.loads((Path(args.without) / "eval" / "report.json").read_text())
            walls[name] = float("nan")
            continue
        result = measured(python("-m", "finetune", "train", str(ROOT / "recipes" / "smollm2-support.yaml"),
                                 "--output", str(run), "--set", f"train.rehearsal={share}", *common), check=False)
        if result["returncode"] not in (0, 3):  # 3: a gate failed; the report is still written
            raise SystemExit(f"ft train failed:\n{result['output'][-4000:]}")
        reports[name] = json.loads((run / "eval" / "report.json").read_text())
        walls[name] = result["wall_s"]
    without, with_ = rows_of(reports["without"]), rows_of(reports["with"])
    lines, inside = [], {}
    for key, row in without.items():
        other = with_.get(key)
        if other is None:
            continue
        low, high = row["ci"]
        delta = other["delta"]
        job = not key.startswith("general.")
        if job:
            inside[key] = low <= delta <= high
        lines.append([key, f"{row['delta']:+.4f} [{low:+.4f}, {high:+.4f}]",
                      f"{delta:+.4f} [{other['ci'][0]:+.4f}, {other['ci'][1]:+.4f}]",
                      ("yes" if inside[key] else "NO") if job else ""])
    print(machine())
    print(f"demo, {args.steps} steps, seed as the recipe; rehearsal share {args.share}; "
          f"benchmarks: first {args.benchmark_items} items; wall: {walls['without']:.0f} s / {walls['with']:.0f} s")
    print(table(["row (delta vs base)", "without rehearsal", f"with rehearsal {args.share}",
                 "job metric within the interval without"], lines))
    path = write_result("rehearsal", {"machine": machine(), "share": args.share, "steps": args.steps,
                                      "benchmark_items": args.benchmark_items, "wall_s": walls,
                                      "within_interval": inside, "reports": reports})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
