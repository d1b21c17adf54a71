"""export.json: what `ft export` did, as a typed record with its one writer and reader.

The defaults are what an export.json written before a field existed means.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from finetune.run import Record, RunDir, write_json

REPORT_FILE = "export.json"


class ConvertRecord(Record):
    """The merge and the 16-bit GGUF (export/gguf_file.write_gguf)."""

    tensors: int
    lora_merged: int
    skipped: list[str] = Field(default_factory=list)  # checkpoint tensors a text-only GGUF leaves out
    seconds: float = 0.0


class ImatrixRecord(Record):
    """The importance matrix the quantization was calibrated with, and whether it shipped."""

    tokens: int
    conversations: int
    tensors: int
    silent_uncalibrated: list[str] = Field(default_factory=list)  # matrices no calibration token drove
    seconds: float = 0.0
    kl_vs_16bit: dict[str, float] | None = None  # "calibrated" / "uncalibrated": mean KL from the 16-bit file
    used: bool = True  # False: the uncalibrated file was closer and shipped instead


class VerifyOutcome(Record):
    passed: bool
    failures: list[str] = Field(default_factory=list)  # the checks in detail: verify.json


class ExportReport(Record):
    run: str
    quant: str  # the shipped type (what --quant auto chose, under auto)
    base: str
    arch: str
    preflight: list[str] = Field(default_factory=list)
    convert: ConvertRecord | None = None
    imatrix: ImatrixRecord | None = None  # None: quantized without calibration (or 16-bit)
    quantize_seconds: float | None = None
    auto: dict[str, Any] | None = None  # --quant auto's scores (also quant_auto.json)
    verify: VerifyOutcome | None = None  # None: --no-verify
    hf: dict[str, Any] | None = None  # --format hf: shards, tensors, bytes
    files: dict[str, int] = Field(default_factory=dict)  # every file in export/ and its size in bytes
    seconds: float | None = None
    peak_rss_mib: float | None = None


def write_export_report(run: RunDir, report: ExportReport) -> None:
    write_json(run.export_dir / REPORT_FILE, report.model_dump(mode="json"))


def read_export_report(run: RunDir) -> ExportReport | None:
    """The run's last export, or None when it has not been exported."""
    path = run.export_dir / REPORT_FILE
    return ExportReport.model_validate_json(path.read_text(encoding="utf-8")) if path.is_file() else None
