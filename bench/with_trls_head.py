"""`ft train` scoring its loss through TRL's own LM head on the CPU (ft's CpuLogProbs off): the
baseline the CPU benches compare ft's head with, in the same run.

    python -m bench.with_trls_head train RECIPE [ft train's options]

TRL's compact path (labelled positions only) stays on: what is compared is the head alone.
"""

from __future__ import annotations

import sys

from finetune import lm_head


def main() -> None:
    lm_head.fused_head_for_cpu = lambda trl_function: trl_function  # score_only_trained_positions installs this
    from finetune.cli import main as ft

    sys.argv = ["ft", *sys.argv[1:]]
    ft()


if __name__ == "__main__":
    main()
