"""Library chatter goes to a log file in the run folder; the terminal shows ft's own lines.

torch, transformers, bitsandbytes, peft and TRL log warnings a user cannot act on ("Failed to load
CPU gemm_4bit_forward from kernels-community", deprecations inside the libraries). They are kept,
not dropped: records are buffered in memory from the start of the command (the run folder may
not exist yet, or be about to be replaced by --overwrite) and written to `<run>/logs/<command>.log`
once `attach` names the file; from then on they are appended as they come.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Buffer(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_buffer: _Buffer | None = None
_file: logging.FileHandler | None = None


def capture() -> None:
    """Route every library logger and Python warning into the buffer. Call again after importing
    transformers: it installs its own stderr handler on import."""
    global _buffer
    if _buffer is None:
        _buffer = _Buffer()
        _buffer.setFormatter(logging.Formatter(FORMAT))
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(_buffer)
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)  # warnings.warn → the "py.warnings" logger → the file
        warnings.simplefilter("default")  # each distinct warning once per place, into the file
        # except unclosed-file notices, which Python emits at exit after logging has shut down
        warnings.filterwarnings("ignore", category=ResourceWarning)
    import sys

    if "transformers" in sys.modules:  # its own stderr handler, and no propagation: undo both
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        hf_logging.set_verbosity_warning()


def quiet_hf_libraries() -> None:
    """Import transformers and datasets, turn off their progress bars, route their logs here."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    capture()  # again, now that transformers is imported: its own stderr handler is removed


def attach(path: Path) -> Path:
    """Write what was buffered to `path` and append everything after it there."""
    global _file
    if _buffer is None:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    if _file is not None:
        root.removeHandler(_file)
        _file.close()
    _file = logging.FileHandler(path, encoding="utf-8")
    _file.setFormatter(logging.Formatter(FORMAT))
    for record in _buffer.records:
        _file.handle(record)
    _buffer.records.clear()
    root.removeHandler(_buffer)
    root.addHandler(_file)
    return path
