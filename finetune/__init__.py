"""ft: recipe → 4-bit LoRA SFT → held-out eval vs the base → merge → GGUF + Ollama Modelfile."""

__version__ = "0.1.0"
