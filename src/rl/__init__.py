"""GRPO post-training on TorchTitan models, with every weight movement through a Checkpointer.

The trainer publishes each new policy with ``Checkpointer.save(step)`` on ``[weight_sync]``;
the generator pulls it with its own ``Checkpointer.load()``. Which backend carries the weights is
TOML, never code: this package imports only ``checkpointing``'s public API.
"""
