"""Built-in backends, registered by name. Each lives in its own module; importing one is cheap."""

from ..backend import register_backend


def _lazy(module: str, cls: str):
    def factory(ctx):
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{module}"), cls)(ctx)

    factory.__qualname__ = f"{module}.{cls}"
    return factory


register_backend("dcp", _lazy("dcp", "DCPBackend"), replace=True)
register_backend("hf", _lazy("hf", "HFBackend"), replace=True)
register_backend("memory", _lazy("memory", "MemoryBackend"), replace=True)
