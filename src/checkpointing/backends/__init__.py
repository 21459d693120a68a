"""Built-in backends: one module (or small package) each, declaring a ``SPEC``.

They are registered exactly like plugins, by reference (``module:SPEC``), so importing this
package imports none of them: a backend's module (and its torch imports) loads when it is first
selected, listed with its options, or parsed from a config.
"""

BUILTIN_SPECS = {
    "dcp": "checkpointing.backends.dcp:SPEC",
    "hf": "checkpointing.backends.hf:SPEC",
    "memory": "checkpointing.backends.memory:SPEC",
    "dist": "checkpointing.backends.dist:SPEC",
}
