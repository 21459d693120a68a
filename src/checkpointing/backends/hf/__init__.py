"""The Hugging Face safetensors backend (``backend = "hf"``); see :mod:`.backend`."""

from .backend import SPEC, HFBackend, HFOptions

__all__ = ["HFBackend", "HFOptions", "SPEC"]
