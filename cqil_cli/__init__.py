"""cqil: shorten the depth of decoder LLM inference (CQIL, layer skipping, layer pruning)."""

__version__ = "0.1.0"


def _register_converted_architecture() -> None:
    # Importing cqil makes `model_type: cqil` folders loadable without trust_remote_code.
    try:
        from .runtime.checkpoint import register_auto_classes
    except ImportError:  # runtime not built yet, or torch missing
        return
    register_auto_classes()


_register_converted_architecture()
