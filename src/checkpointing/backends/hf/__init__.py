"""The Hugging Face safetensors backend (``backend = "hf"``); see :mod:`.backend`."""

from .backend import HFBackend

__all__ = ["HFBackend"]
