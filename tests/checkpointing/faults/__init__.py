"""Fault-injection helpers shared by ``tests/checkpointing/test_faults_*.py``.

Faults are real: a saving process is SIGKILLed at a chosen instant (the child patches the
point it dies at; production code has no hooks), bytes on disk are flipped or cut, metadata is
crafted by hand. Nothing here stands in for DCP, safetensors or TorchTitan.
"""
