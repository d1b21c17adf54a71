"""The reference that verification compares GGUF files against, in bounded memory.

The fine-tuned model as transformers and peft compute it (the original base in fp32, the adapter
applied by peft's own LoRA forward, unmerged), without ever holding the whole model: the decoder
is built on the meta device and each layer's weights are read from the safetensors just before it
runs and released right after; the embedding rows are read for the tokens in use only; logits are
computed over the vocabulary in row blocks of `lm_head` and written to a file-backed array. Peak
memory is about one decoder layer in fp32 plus one block of `lm_head`, whatever the model's size.

Independent of the converter it checks: no name map, no per-architecture transform, no merge code
is shared with export/arches.py, export/merge.py or export/gguf_file.py. A converter bug therefore
shows as a difference instead of being reproduced on both sides.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

VOCAB_BLOCK_BYTES = 256 << 20  # one fp32 block of lm_head rows at a time


class Weights:
    """A checkpoint's tensors by the name a text-only CausalLM gives them (hub vision-language
    checkpoints nest the text model under `model.language_model.`)."""

    def __init__(self, folder: Path):
        import json

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = {n: folder / f for n, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            files = {}
            for file in sorted(folder.glob("*.safetensors")):
                with safe_open(file, framework="pt") as f:
                    files.update({n: file for n in f.keys()})
        self.files = {n.replace("model.language_model.", "model."): (n, f) for n, f in files.items()}

    def shape(self, name: str) -> tuple[int, ...]:
        original, file = self.files[name]
        with safe_open(file, framework="pt") as f:
            return tuple(f.get_slice(original).get_shape())

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        original, file = self.files[name]
        with safe_open(file, framework="pt") as f:
            tensor = f.get_tensor(original) if rows is None else f.get_slice(original)[rows]
        return tensor.float()


def _base_name(parameter: str) -> str:
    """`base_model.model.model.layers.0.mlp.up_proj.base_layer.weight` → `model.layers.0.mlp.up_proj.weight`."""
    return parameter.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _stream(module: torch.nn.Module, prefix: str, weights: Weights) -> None:
    """Load `module`'s base weights just before it runs; put them back on meta right after."""
    from accelerate.utils import set_module_tensor_to_device

    names = [n for n, p in module.named_parameters() if p.device.type == "meta"]

    def load(mod, args):
        for n in names:
            set_module_tensor_to_device(mod, n, "cpu", value=weights.read(_base_name(f"{prefix}.{n}")))

    def unload(mod, args, output):
        for n in names:
            set_module_tensor_to_device(mod, n, "meta")

    module.register_forward_pre_hook(load)
    module.register_forward_hook(unload)


def _load_adapter(model, adapter_dir: Path) -> None:
    """peft leaves the adapter's tensors on meta when the base is on meta: assign them from the
    file (peft saves them without the adapter name, `.lora_A.weight` for `.lora_A.default.weight`)."""
    from accelerate.utils import set_module_tensor_to_device
    from safetensors.torch import load_file

    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    for name, parameter in list(model.named_parameters()):
        if parameter.device.type == "meta" and "lora_" in name:
            set_module_tensor_to_device(model, name, "cpu", value=saved[name.replace(".default", "")].float())


def reference_logits(base_dir: Path, adapter_dir: Path, sequences: list[list[int]], out: Path) -> np.memmap:
    """Logits of the fine-tuned model for each sequence, stacked over positions into a float32
    file at `out` ([sum of lengths, vocabulary]); position t of a sequence predicts token t+1."""
    from accelerate import init_empty_weights
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir).get_text_config()
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = PeftModel.from_pretrained(skeleton, str(adapter_dir), low_cpu_mem_usage=True).eval()
    _load_adapter(model, adapter_dir)
    weights = Weights(base_dir)
    decoder = model.get_base_model().model
    for i, layer in enumerate(decoder.layers):
        _stream(layer, f"base_model.model.model.layers.{i}", weights)
    _stream(decoder.norm, "base_model.model.model.norm", weights)

    # right-padded batch: causal attention and the recurrent layers never see what comes after
    width = max(map(len, sequences))
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    used = sorted(set(ids.flatten().tolist()))
    table = torch.stack([weights.read("model.embed_tokens.weight", slice(t, t + 1))[0] for t in used])
    embeds = table[torch.searchsorted(torch.tensor(used), ids)]
    with torch.no_grad():
        hidden = decoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    hidden = torch.cat([hidden[row, :len(seq)] for row, seq in enumerate(sequences)])
    del embeds, table

    head = "lm_head.weight" if "lm_head.weight" in weights.files else "model.embed_tokens.weight"  # tied
    vocab, dim = weights.shape(head)
    logits = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(hidden.shape[0], vocab))
    block = max(1, VOCAB_BLOCK_BYTES // (4 * dim))
    with torch.no_grad():
        for start in range(0, vocab, block):
            rows = weights.read(head, slice(start, min(start + block, vocab)))
            logits[:, start:start + rows.shape[0]] = (hidden @ rows.t()).numpy()
    logits.flush()
    return logits
