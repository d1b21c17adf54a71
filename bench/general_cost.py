"""What the general section adds to `ft eval`, on the README's demo run.

    python -m bench.general_cost [RUN]

RUN: a finished run of recipes/smollm2-support.yaml (default: trains one with a 12-step budget).
`ft eval` runs four times, each in its own process with the run's eval settings (the demo's: 60
held-out tickets, one batch of 64, 64 new tokens) and a fresh eval cache: without the general
section (once to fill the held-out base cache, then timed), then with it (first run: the base's
general answers are generated; second run: they come from the cache). Printed: each wall time
and the section's share, cached and first-run.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.common import ROOT, machine, measured, python, table, write_result

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", help="a finished smollm2-support run (default: train one, 12 steps)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ft-bench-general-"))
    run = Path(args.run) if args.run else work / "smollm2-support"
    if not args.run:
        measured(python("-m", "finetune", "train", str(ROOT / "recipes" / "smollm2-support.yaml"), "--output",
                        str(run), "--set", "train.max_steps=12", "--set", "eval.after_train=false"))
    cache = {"FT_CACHE": str(work / "cache")}  # the run's base is read from its adapter's recorded path

    def ft_eval(*extra: str) -> float:
        # the demo's section: no benchmark files (a run trained with some keeps them in its recipe)
        result = measured(python("-m", "finetune", "eval", str(run), "--set", "eval.general.benchmarks=[]", *extra),
                          env=cache)
        return result["wall_s"]

    ft_eval("--set", "eval.general.enabled=false")  # fills the held-out base cache
    without = ft_eval("--set", "eval.general.enabled=false")
    first = ft_eval()
    cached = ft_eval()
    rows = [["ft eval, no general section (held-out base cached)", f"{without:.1f}", ""],
            ["ft eval with it, first run (the base's general answers generated)", f"{first:.1f}",
             f"+{100 * (first - without) / without:.0f}%"],
            ["ft eval with it, the base's answers cached", f"{cached:.1f}", f"+{100 * (cached - without) / without:.0f}%"]]
    print(machine())
    print(table(["", "wall s", "added"], rows))
    path = write_result("general_cost", {"machine": machine(), "run": str(run), "without_s": without,
                                         "first_s": first, "cached_s": cached,
                                         "added_cached": (cached - without) / without,
                                         "added_first": (first - without) / without})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
