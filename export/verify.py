"""Proof that the exported file behaves like the model that was trained and evaluated.

1. tokenizer parity: HF tokenizer and llama.cpp give identical ids on a fixed corpus (unicode,
   digits, whitespace runs, code, special tokens) plus the held-out prompts as served;
2. logit parity on held-out conversations: the 16-bit GGUF against the merged model in
   transformers (top-1 agreement and mean KL); the quantized file against the same, with looser
   bounds that still fail a broken file;
3. stops: given held-out prompts rendered with the served template (the one the Modelfile's
   TEMPLATE reproduces), the shipped file ends its answers with an end-of-turn token as often as
   the fine-tuned model does. The fine-tuned model's own rate is the 16-bit file's, which step 2
   has just shown to compute the same logits; an under-trained model that never stops yet is
   therefore not held against its export;
4. structure: the shipped file is llama.cpp's quantization of the verified 16-bit file: the same
   metadata (but the file type), the same tensors, each reconstructing its 16-bit original within
   quantization error on sampled rows. On a real model, output checks alone cannot tell a coarse
   faithful file from a subtly broken one (bench/verify_calibration.py: SmolLM2-135M's faithful
   q5_k_m has KL 0.52 and decisive top-1 0.838, its q4_k_m with two layers swapped 0.29 and 0.894,
   with a tenth of the rope base 0.16 and 0.915); tensor by tensor the two sides are 20× apart
   (faithful ≤ 0.065 relative error, a misplaced tensor ≈ 1.4) and the rope base is metadata.

The reference is export/reference.py: transformers + peft, streamed one layer at a time.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from export.llama import GGUFModel

# A correct converter matches to float precision (an F16 file measured KL < 1e-5 on the twins), and the 16-bit
# file is held to that. The quantized file is llama.cpp's quantization of that verified file; how
# far it drifts depends on the model, not on ft: quantization flips near-ties, a random-weight or
# barely trained model is almost all near-ties, and a deep random network amplifies the noise.
# Measured on faithful Q4_K_M files: 4-layer twins (random weights to 200 steps) KL 0.002-0.004,
# top-1 0.68-0.93 over all positions; a 24-layer, 3 GB random-weight Qwen3.5 (bench/export_memory)
# KL 0.156, top-1 0.17; the 32-layer Qwen3.5-9B-shaped random-weight checkpoint (bench/full_size)
# KL 0.394, top-1 0.19, while its 16-bit file matched to KL 8e-6. On a real model
# (bench/verify_calibration.py: SmolLM2-135M fine-tuned 60 steps, the README's run, 32 held-out
# conversations, 2,377 decisive positions): q8_0 KL 0.006, q6_k 0.014, q4_k_m 0.090 with decisive
# top-1 0.946, q5_k_m 0.516 with 0.838 (its Q5_1 fallback for 576-wide rows: the same 5% tensor
# error as q4_k_m's Q5_0, six times the KL, in transformers on the dequantized weights as in
# llama.cpp); the base model's q4_k_m shipped in place of the fine-tune's: KL 1.72, decisive top-1
# 0.54, stops 0.09 against 1.00. So top-1 counts only where the reference is decisive (its top
# token leads the runner-up by DECISIVE_MARGIN in probability: a trained model's answer tokens),
# at a bound 0.14 under the least faithful file measured; kl_max only catches garbage (1 nat:
# twice that file, 2.5× the deepest random-weight one, 0.6× the wrong model); the stops check
# compares behaviour with the fine-tuned model's own; and the structure check (4. above) catches
# the corruptions behaviour cannot (two layers swapped: 0.894 and KL 0.29; a tenth of the rope
# base: 0.915 and 0.16, both better than the faithful q5_k_m).
DECISIVE_MARGIN = 0.2
class LogitBounds(BaseModel):
    """A file's logits against the reference's: it fails below a top-1 bound or above kl_max."""

    model_config = ConfigDict(frozen=True)
    kl_max: float
    top1_min: float | None = None  # over every position
    top1_decisive_min: float | None = None  # over the positions where the reference is decisive


class Bounds(BaseModel):
    """Every bound verification holds an export to (numbers and their reasons in the comment above)."""

    model_config = ConfigDict(frozen=True)
    sixteen_bit: LogitBounds = LogitBounds(top1_min=0.99, kl_max=1e-3)
    quantized: LogitBounds = LogitBounds(top1_decisive_min=0.7, kl_max=1.0)
    stop_rate_drop_max: float = 0.25  # shipped file's clean stops vs the 16-bit file's, same prompts
    # ‖dequantized − 16-bit‖ / ‖16-bit‖ per tensor, on sampled rows: faithful files measured ≤ 0.065
    # on a real model (Q5_0/Q5_1 0.052, Q4_K 0.020, Q8_0 0.0065) and ~0.1 on random weights; a
    # tensor from another layer or model ≈ 1.4
    structure_rel_error_max: float = 0.25
    # 2- and 3-bit types round coarser: a faithful Q2_K tensor of a random-weight twin is 0.30 off
    # (each bit less about doubles the error), still under half of a misplaced tensor's 1.4
    structure_rel_error_max_by_type: dict[str, float] = {"Q3_K": 0.45, "IQ3_S": 0.45, "IQ3_XXS": 0.5, "Q2_K": 0.6}

    def structure_bound(self, tensor_type: str) -> float:
        return self.structure_rel_error_max_by_type.get(tensor_type, self.structure_rel_error_max)


BOUNDS = Bounds()
STRUCTURE_ROWS = 64  # rows sampled per tensor: a misplaced tensor is wrong in every row
# keys the quantizer itself writes or changes; anything else must be the 16-bit file's
QUANTIZER_KEYS = ("general.file_type", "general.quantization_version")

CORPUS = [
    "Hello world! How are you today?",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand   runs     of spaces",
    "Numbers: 0 1 12 123 1234 12345 3.14159 -42 1e10 2026-11-22",
    "Unicode: café, naïve, Ünïcödé, Ελληνικά, русский, 日本語のテキスト, 中文, 한국어, עברית, العربية",
    "Combining marks: e\u0301 a\u0308 and emoji 🚀😶‍🌫️✅👍🏽",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    'JSON: {"category": "billing", "priority": "high", "ok": true, "n": [1, 2, 3]}',
    "I've been 'told' he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea?",
    "------======= ...... !!!!!! ?????? ''''''```````\"\"\"\"",
]


@dataclass
class Verification:
    checks: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def tokenizer_parity(tokenizer, gguf: GGUFModel, texts: list[str], specials: list[str]) -> dict:
    """Identical ids, or a mismatch. One difference is known and only reported: Qwen's HF
    tokenizer NFC-normalizes its input and llama.cpp does not, so text with decomposed accents
    (e + U+0301) tokenizes differently unless the client sends NFC text (most do)."""
    cases = CORPUS + [" ".join(specials) + " text after specials"] + texts
    mismatches, nfc_only = [], []
    for text in cases:
        hf = tokenizer.encode(text, add_special_tokens=False)
        lc = gguf.tokenize(text)
        if hf == lc:
            continue
        entry = {"text": text[:200], "hf": hf[:40], "llama_cpp": lc[:40]}
        if gguf.tokenize(unicodedata.normalize("NFC", text)) == hf:
            nfc_only.append(entry)
        else:
            mismatches.append(entry)
    return {"cases": len(cases), "identical": len(cases) - len(mismatches) - len(nfc_only),
            "mismatches": mismatches[:5], "nfc_normalization_only": nfc_only[:5]}


PARITY_POSITIONS = 32  # positions compared at once: a few [32, vocabulary] fp32 temporaries


def file_logits(path: Path, sequences: list[list[int]], out: Path, log: Path | None = None) -> np.memmap:
    """A GGUF file's logits for each sequence, stacked over positions into a float32 file at `out`
    (positions × vocabulary: 2.4 GB for a 9B's vocabulary on 8 conversations, so not in memory)."""
    starts = np.cumsum([0, *map(len, sequences)])
    with GGUFModel(path, max(map(len, sequences)) + 16, log) as model:
        logits = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32,
                                           shape=(int(starts[-1]), model.llm.n_vocab()))
        for ids, at in zip(sequences, starts):
            logits[at:at + len(ids)] = model.logits(ids)
    logits.flush()
    return logits


def logit_parity(reference: np.ndarray, candidate: GGUFModel | np.ndarray, sequences: list[list[int]]) -> dict:
    """`reference`: the sequences' logits stacked over positions (a file-backed array); `candidate`:
    a loaded GGUF file, or its logits already stacked the same way (file_logits)."""
    agree, decisive, decisive_agree, kls, at = 0, 0, 0, [], 0
    for ids in sequences:
        scores = candidate[at:at + len(ids)] if isinstance(candidate, np.ndarray) else candidate.logits(ids)
        for start in range(0, len(ids), PARITY_POSITIONS):
            end = min(start + PARITY_POSITIONS, len(ids))
            ref = torch.from_numpy(np.asarray(reference[at + start:at + end]))
            got = torch.from_numpy(scores[start:end, : ref.shape[1]])
            p = torch.log_softmax(ref, -1)
            q = torch.log_softmax(got, -1)
            probs = p.exp()
            kls.append((probs * (p - q)).sum(-1))
            same = ref.argmax(-1) == got.argmax(-1)
            top2 = probs.topk(2, dim=-1).values
            sure = (top2[:, 0] - top2[:, 1]) >= DECISIVE_MARGIN
            agree += int(same.sum())
            decisive += int(sure.sum())
            decisive_agree += int((same & sure).sum())
        at += len(ids)
        del scores
    kl = torch.cat(kls)
    return {"positions": at, "top1_agreement": agree / at, "decisive_positions": decisive,
            "top1_agreement_decisive": decisive_agree / decisive if decisive else None,
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max())}


def stops(gguf: GGUFModel, tokenizer, prompts: list[list[int]], stop_ids: set[int], max_new_tokens: int) -> dict:
    results = []
    for ids in prompts:
        new, stopped = gguf.generate(ids, max_new_tokens, stop_ids)
        results.append({"stopped": stopped, "output": tokenizer.decode(new)[:300]})
    rate = sum(r["stopped"] for r in results) / max(len(results), 1)
    return {"prompts": len(results), "stop_rate": rate, "examples": results[:3]}


def check_logits(v: Verification, name: str, result: dict, bounds: LogitBounds) -> None:
    v.checks[name] = {**result, "bounds": bounds.model_dump(exclude_none=True)}
    top1, decisive = result["top1_agreement"], result["top1_agreement_decisive"]
    low_top1 = bounds.top1_min is not None and top1 < bounds.top1_min
    low_decisive = bounds.top1_decisive_min is not None and decisive is not None and decisive < bounds.top1_decisive_min
    if low_top1 or low_decisive or result["kl_mean"] > bounds.kl_max:
        said = f"top-1 agreement {top1:.4f}" + (f" (min {bounds.top1_min})" if bounds.top1_min is not None else "")
        if decisive is not None and bounds.top1_decisive_min is not None:
            said += (f", on {result['decisive_positions']} decisive positions {decisive:.4f} "
                     f"(min {bounds.top1_decisive_min})")
        v.failures.append(f"{name}: {said}, mean KL {result['kl_mean']:.2e} (max {bounds.kl_max:g})")


def field_bytes(reader, key: str) -> bytes | None:
    field = reader.fields.get(key)
    return None if field is None else b"".join(part.tobytes() for part in field.parts)


def rows_of(tensor, rows) -> np.ndarray:
    data = tensor.data
    return np.asarray(data[rows] if data.ndim > 1 else data)


def structure(sixteen_bit: Path, shipped: Path) -> dict:
    """Is `shipped` a quantization of `sixteen_bit`? Metadata compared key by key (as bytes); every
    tensor's sampled rows dequantized by gguf-py and compared with the 16-bit rows. Memory-mapped,
    a few rows at a time: cheap at any model size."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    ours, theirs = GGUFReader(sixteen_bit), GGUFReader(shipped)
    keys = sorted(set(ours.fields) | set(theirs.fields))
    metadata = [k for k in keys if k not in QUANTIZER_KEYS and not k.startswith(("quantize.", "GGUF."))
                and field_bytes(ours, k) != field_bytes(theirs, k)]  # GGUF.*: the reader's view of the header
    reference = {t.name: t for t in ours.tensors}
    shipped_names = {t.name for t in theirs.tensors}
    worst: dict[str, float] = {}
    over, shapes = [], []
    for t in theirs.tensors:
        r = reference.get(t.name)
        if r is None or list(r.shape) != list(t.shape):
            shapes.append(t.name)
            continue
        n = r.data.shape[0] if r.data.ndim > 1 else 1
        rows = np.unique(np.linspace(0, n - 1, min(n, STRUCTURE_ROWS)).astype(np.int64))
        want = rows_of(r, rows).astype(np.float32)
        got = dequantize(rows_of(t, rows), t.tensor_type).reshape(want.shape)
        error = float(np.linalg.norm(got - want) / max(float(np.linalg.norm(want)), 1e-30))
        worst[t.tensor_type.name] = max(worst.get(t.tensor_type.name, 0.0), error)
        bound = BOUNDS.structure_bound(t.tensor_type.name)
        if error > bound:
            over.append({"tensor": t.name, "type": t.tensor_type.name, "relative_error": round(error, 4),
                         "bound": bound})
    missing = sorted(set(reference) - shipped_names)
    return {"metadata_differs": metadata, "tensors": len(theirs.tensors), "missing": missing[:5],
            "shape_or_name_differs": shapes[:5], "worst_relative_error_by_type": worst,
            "tensors_over_bound": over[:5], "tensors_over_bound_count": len(over),
            "bound": BOUNDS.structure_rel_error_max, "bound_by_type": BOUNDS.structure_rel_error_max_by_type}


def check_structure(v: Verification, result: dict) -> None:
    v.checks["structure"] = result
    if result["metadata_differs"]:
        v.failures.append(f"structure: the shipped file's metadata differs from the verified 16-bit file's in "
                          f"{', '.join(result['metadata_differs'][:5])}")
    if result["missing"] or result["shape_or_name_differs"]:
        v.failures.append(f"structure: tensors missing or reshaped in the shipped file: "
                          f"{', '.join(result['missing'] + result['shape_or_name_differs'])}")
    if result["tensors_over_bound"]:
        first = result["tensors_over_bound"][0]
        v.failures.append(f"structure: {result['tensors_over_bound_count']} tensors are not a quantization of the "
                          f"verified 16-bit file's, e.g. {first['tensor']} ({first['type']}) is "
                          f"{first['relative_error']:.2f} off (max {first['bound']})")


def verify(*, tokenizer, reference: np.ndarray, sequences: list[list[int]], prompts: list[list[int]],
           prompt_texts: list[str], stop_ids: set[int], specials: list[str], sixteen_bit: Path,
           quantized: Path, max_new_tokens: int, log: Path | None,
           sixteen_bit_logits: np.ndarray | None = None) -> Verification:
    """`sixteen_bit_logits`: the 16-bit file's logits on `sequences` when export already has them
    (it compared calibrated and plain quantizations with them): not computed twice."""
    v = Verification()
    n_ctx = max(len(s) for s in sequences + prompts) + max_new_tokens + 16
    with GGUFModel(sixteen_bit, n_ctx, log) as gguf:
        parity = tokenizer_parity(tokenizer, gguf, prompt_texts, specials)
        v.checks["tokenizer"] = parity
        if parity["mismatches"]:
            v.failures.append(f"tokenizer: {len(parity['mismatches'])} of {parity['cases']} texts tokenize "
                              f"differently in llama.cpp, e.g. {parity['mismatches'][0]['text'][:60]!r}")
        sixteen = gguf if sixteen_bit_logits is None else sixteen_bit_logits
        check_logits(v, "logits_16bit", logit_parity(reference, sixteen, sequences), BOUNDS.sixteen_bit)
        fine_tuned = stops(gguf, tokenizer, prompts, stop_ids, max_new_tokens)
    if quantized == sixteen_bit:
        shipped = fine_tuned
    else:
        check_structure(v, structure(sixteen_bit, quantized))
        with GGUFModel(quantized, n_ctx, log) as gguf:
            check_logits(v, "logits_shipped", logit_parity(reference, gguf, sequences), BOUNDS.quantized)
            shipped = stops(gguf, tokenizer, prompts, stop_ids, max_new_tokens)
    drop = BOUNDS.stop_rate_drop_max
    v.checks["stops"] = {**shipped, "fine_tuned_stop_rate": fine_tuned["stop_rate"], "max_drop": drop}
    if shipped["stop_rate"] < fine_tuned["stop_rate"] - drop:
        v.failures.append(f"stops: {shipped['stop_rate']:.0%} of held-out answers from the shipped file ended with "
                          f"an end-of-turn token within {max_new_tokens} tokens, against "
                          f"{fine_tuned['stop_rate']:.0%} for the fine-tuned model (16-bit)")
    return v
