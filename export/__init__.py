"""ft export: merge the adapter into the original base in bounded memory, write a GGUF with ft's own
converter on gguf-py, quantize it with llama.cpp, write the Ollama Modelfile, and verify the files
against a transformers + peft reference before anything is given its final name.

checkpoint.py reads the base tensor by tensor; merge.py holds the LoRA deltas; arches.py is the
per-architecture converter; vocab.py the tokenizer; gguf_file.py the streaming writer; quantize.py
and llama.py are llama.cpp; reference.py and verify.py the verification; modelfile.py, hf.py and
runner.py the outputs.

May import finetune (recipes, registry, data, run folder); never eval. finetune imports export only
from its CLI.
"""
