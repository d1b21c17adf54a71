"""Importance matrix from the run's own training conversations: what `llama-imatrix` computes,
computed by the pinned llama.cpp on the verified 16-bit file, handed to its quantizer.

For every weight a matrix multiplication reads, the mean over tokens of each input channel's
squared activation (llama.cpp's `IMatrixCollector::collect_imatrix`, tools/imatrix/imatrix.cpp).
The quantizer then minimizes each row's error weighted by it, so channels the model actually
drives on this job are kept sharpest. Why collect inside llama.cpp rather than in transformers:
the activations come from the file that ships, keyed by the names it has, in the head order ggml
computes in (Qwen3.5's tiled value heads, its fused qkv projection), so no permutation of ft's
converter has to be mirrored by hand. tests/test_imatrix.py recomputes it independently in
transformers, mapped through the converter's own transforms, and the two agree.

Why by hand: llama.cpp's collector is a command-line tool that llama-cpp-python does not build;
its callback (`cb_eval`) is exposed, and the per-channel sum of squares is the whole computation.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GGML_TYPE_F32 = 0  # ggml.h enum ggml_type


class GGMLTensor(ctypes.Structure):
    """`struct ggml_tensor` (ggml/include/ggml.h of the pinned llama.cpp); checked against the
    library's own size (`ggml_tensor_overhead`) and name accessor before use."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


GGML_OBJECT_SIZE = 32  # struct ggml_object: offs, size, next, type, padding[4]


def _ggml():
    from llama_cpp._ggml import libggml

    libggml.ggml_op_name.restype = ctypes.c_char_p
    libggml.ggml_op_name.argtypes = [ctypes.c_int]
    libggml.ggml_get_name.restype = ctypes.c_char_p
    libggml.ggml_get_name.argtypes = [ctypes.c_void_p]
    libggml.ggml_tensor_overhead.restype = ctypes.c_size_t
    if libggml.ggml_tensor_overhead() - GGML_OBJECT_SIZE != ctypes.sizeof(GGMLTensor):
        raise RuntimeError("this llama.cpp's struct ggml_tensor is not the layout export/imatrix.py reads")
    return libggml


@dataclass
class Importance:
    """Per GGUF weight name: the sum over tokens of each input channel's squared activation, and
    the number of tokens (the quantizer takes sums / tokens)."""

    sums: dict[str, np.ndarray]
    tokens: int
    sequences: int

    def means(self) -> dict[str, np.ndarray]:
        return {name: (s / self.tokens).astype(np.float32) for name, s in self.sums.items()}


def weight_name(raw: bytes) -> str:
    """llama-imatrix's filter_tensor_name: a backend may prefix `CUDA0#name#...`."""
    name = raw.decode("utf-8", "replace")
    if "#" in name:
        name = name.split("#")[1]
    return name


def rows_of(t: GGMLTensor) -> np.ndarray:
    """The [rows, ne0] view of an F32 activation tensor in host memory, any row strides (its
    elements are contiguous: llama-imatrix asserts the same)."""
    ne0, ne1, ne2, ne3 = t.ne
    nb0, nb1, nb2, nb3 = t.nb
    assert t.type == GGML_TYPE_F32 and nb0 == 4, "imatrix reads F32 activations with contiguous rows"
    extent = (ne3 - 1) * nb3 + (ne2 - 1) * nb2 + (ne1 - 1) * nb1 + ne0 * nb0
    base = np.frombuffer((ctypes.c_char * extent).from_address(t.data), dtype=np.float32)
    view = np.lib.stride_tricks.as_strided(base, shape=(ne3, ne2, ne1, ne0), strides=(nb3, nb2, nb1, nb0))
    return view.reshape(-1, ne0)


class Collector:
    """The `cb_eval` callback: asked for every graph node; collects the inputs of MUL_MAT nodes
    whose weight is a decoder-block tensor (`blk.*`), as llama-imatrix does by default (the output
    head is left out: its input is the final norm's, and llama-imatrix leaves it out too)."""

    def __init__(self):
        self.lib = _ggml()
        self.sums: dict[str, np.ndarray] = {}
        self.rows: dict[str, int] = {}
        self.error: Exception | None = None
        self.callback = self._make_callback()

    def _wanted(self, t: GGMLTensor) -> str | None:
        if self.lib.ggml_op_name(t.op) != b"MUL_MAT" or not t.src[0] or not t.src[1]:
            return None
        src0, src1 = GGMLTensor.from_address(t.src[0]), GGMLTensor.from_address(t.src[1])
        name = weight_name(src0.name)
        if not name.startswith("blk.") or src1.type != GGML_TYPE_F32 or src0.ne[2] * src0.ne[3] != 1:
            return None  # KQ/KQV products read caches, not weights; 3-D (expert) weights: none here
        return name

    def _make_callback(self):
        import llama_cpp

        def callback(pointer, ask, _user_data):
            try:
                t = GGMLTensor.from_address(pointer)
                name = self._wanted(t)
                if ask or name is None:
                    return name is not None
                x = rows_of(GGMLTensor.from_address(t.src[1])).astype(np.float64)
                acc = self.sums.get(name)
                if acc is None:
                    acc = self.sums[name] = np.zeros(x.shape[1])
                acc += np.einsum("ij,ij->j", x, x)
                self.rows[name] = self.rows.get(name, 0) + x.shape[0]
            except Exception as exc:  # an exception must not cross into C
                self.error = self.error or exc
            return True

        return llama_cpp.ggml_backend_sched_eval_callback(callback)


def decode_every_position(llm, ids: list[int]) -> None:
    """Decode `ids` from an empty cache asking logits at every position, as llama-imatrix does:
    otherwise llama.cpp runs the last layer's feed-forward only on the positions whose logits are
    wanted (`Llama.eval` wants one). The logits stay in llama.cpp's n_batch-row buffer; `Llama`
    would copy all of them into an n_ctx × vocabulary array."""
    llm.reset()
    llm._ctx.kv_cache_seq_rm(-1, 0, -1)
    for start in range(0, len(ids), llm.n_batch):
        llm._batch.set_batch(batch=ids[start:start + llm.n_batch], n_past=start, logits_all=True)
        llm._ctx.decode(llm._batch)


def collect(gguf_path: Path, sequences: list[list[int]], log: Path | None = None) -> Importance:
    """Run each sequence through the file in llama.cpp and collect the importance of every
    decoder-block weight. Each sequence starts from an empty cache (no attention across them)."""
    from llama_cpp import Llama

    from export.llama import default_params, native_log, server_cpu_kernels

    collector = Collector()
    n_ctx = max(map(len, sequences))
    # cb_eval: llama.cpp calls it for every graph node (Llama does not expose it)
    with native_log(log), server_cpu_kernels(), default_params("llama_context_default_params",
                                                               cb_eval=collector.callback):
        # n_batch 64: llama-cpp-python keeps n_batch × vocabulary floats of logits (see GGUFModel)
        llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=min(n_ctx, 64), logits_all=False,
                    verbose=False, n_threads=os.cpu_count())
        try:
            for ids in sequences:
                decode_every_position(llm, ids)
                if collector.error:
                    raise collector.error
        finally:
            llm.close()
    tokens = sum(map(len, sequences))
    uneven = {n: r for n, r in collector.rows.items() if r != tokens}
    if uneven:  # every block weight sees every token once; anything else is a misread graph
        raise RuntimeError(f"importance rows differ from the {tokens} tokens fed: {dict(list(uneven.items())[:3])}")
    return Importance(collector.sums, tokens, len(sequences))


def quantizable_weights(gguf_path: Path) -> dict[str, int]:
    """Decoder-block matrices the quantizer converts (16-bit in ft's file; ft writes the tensors
    llama.cpp keeps in f32 as f32): name → input width (ne0)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    return {t.name: int(t.shape[0]) for t in reader.tensors
            if t.name.startswith("blk.") and len(t.shape) == 2 and t.tensor_type in
            (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)}


def check_covers(importance: Importance, weights: dict[str, int]) -> None:
    """Every matrix the quantizer converts has a vector of its input width, and every vector names
    such a matrix: llama.cpp quantizes a tensor whose name it does not find without calibration,
    saying so only in its log, so a misnamed vector would pass silently."""
    missing = sorted(set(weights) - set(importance.sums))
    unknown = sorted(set(importance.sums) - set(weights))
    wrong = sorted(n for n, s in importance.sums.items() if n in weights and s.shape != (weights[n],))
    bad = sorted(n for n, s in importance.sums.items() if not np.all(np.isfinite(s)) or np.any(s < 0))
    if missing or unknown or wrong or bad:
        raise RuntimeError(f"the importance matrix does not fit the file: missing {missing[:3]}, unknown {unknown[:3]}, "
                           f"wrong width {wrong[:3]}, not finite or negative {bad[:3]}")


# A channel no calibration token drove still counts this much (a fraction of its vector's mean):
# llama.cpp's k-quants give a zero-weighted channel whatever value fits the others, and a whole
# zero vector makes them write zero blocks (a 9B-shaped checkpoint whose gated norm was zero got
# an ssm_out of zeros, caught by verification's structure check: relative error 1.00).
SILENT_CHANNEL_FLOOR = 1e-3


def quantizer_vectors(importance: Importance) -> tuple[dict[str, np.ndarray], list[str]]:
    """The vectors the quantizer gets, and the matrices quantized without one because nothing in
    the calibration drove any of their inputs (better llama.cpp's plain rounding than zeros)."""
    vectors, silent = {}, []
    for name, mean in importance.means().items():
        if not mean.max() > 0:
            silent.append(name)
            continue
        vectors[name] = np.maximum(mean, np.float32(SILENT_CHANNEL_FLOOR * mean.mean()))
    return vectors, sorted(silent)


def quantize_param(importance: Importance):
    """The NULL-terminated `llama_model_imatrix_data` array `llama_model_quantize` reads, and the
    buffers it points into (keep them alive until quantization returns)."""
    import llama_cpp

    means, _ = quantizer_vectors(importance)
    entries = (llama_cpp.llama_model_imatrix_data * (len(means) + 1))()
    keep = []
    for entry, (name, vector) in zip(entries, sorted(means.items())):
        data = np.ascontiguousarray(vector, dtype=np.float32)
        keep.append(data)
        entry.name = name.encode()
        entry.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = data.size
    return entries, keep  # the zeroed last entry (name NULL) ends the array


def write_imatrix_gguf(path: Path, importance: Importance, dataset: str) -> None:
    """(`path` is written as is: export/runner.py writes it under a .partial name and renames it
    with the shipped file.)"""
    """llama.cpp's own imatrix file format (what `llama-imatrix` writes and `llama-quantize
    --imatrix` reads): `<name>.in_sum2` sums and `<name>.counts`, so a user can requantize
    with stock llama.cpp tools."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "imatrix")
    writer.add_type(gguf.GGUFType.IMATRIX)
    writer.add_array(gguf.Keys.IMatrix.DATASETS, [dataset])
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, importance.sequences)
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, max(1, importance.tokens // max(1, importance.sequences)))
    for name, sums in sorted(importance.sums.items()):
        writer.add_tensor(f"{name}.in_sum2", sums.astype(np.float32)[None, :])
        writer.add_tensor(f"{name}.counts", np.array([[importance.tokens]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
