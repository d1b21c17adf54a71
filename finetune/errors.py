"""One kind of error a user can cause, and how it is shown.

Anything the user can fix (a recipe key, a data row, a missing file) raises `UserError`. The CLI
prints it as one block, `error: WHERE: WHAT` and `  fix: HOW`, and exits with code 2. Every other
exception is a bug in ft: exit code 1 with the traceback, so it can be reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EXIT_INTERNAL_ERROR = 1
EXIT_USER_ERROR = 2
EXIT_GATE_FAILED = 3  # an eval.require gate was not met
EXIT_VERIFY_FAILED = 4  # an exported file failed verification


@dataclass
class Problem:
    what: str
    where: str = ""
    fix: str = ""

    def render(self) -> str:
        head = f"{self.where}: {self.what}" if self.where else self.what
        return head + (f"\n  fix: {self.fix}" if self.fix else "")


@dataclass
class UserError(Exception):
    """One or more problems the user can fix. Shown without a traceback; exit code 2."""

    problems: list[Problem] = field(default_factory=list)

    def __init__(self, what: str | list[Problem], where: str = "", fix: str = ""):
        if isinstance(what, list):
            self.problems = what
        else:
            self.problems = [Problem(what, where, fix)]
        super().__init__(self.render())

    def render(self) -> str:
        if len(self.problems) == 1:
            return "error: " + self.problems[0].render()
        lines = [f"error: {len(self.problems)} problems"]
        lines += ["- " + p.render().replace("\n", "\n  ") for p in self.problems]
        return "\n".join(lines)


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint (exit 128 + signal number)."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"signal {signum} at step {step}")


class GateFailed(Exception):
    """A required improvement (eval.require) was not reached (exit 3)."""

    def __init__(self, messages: list[str]):
        self.messages = messages
        super().__init__("\n".join(messages))


class VerifyFailed(Exception):
    """An exported file failed verification; it is kept under a FAILED name (exit 4)."""

    def __init__(self, failures: list[str], path):
        self.failures, self.path = failures, path
        super().__init__("; ".join(failures))
