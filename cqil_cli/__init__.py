"""cqil: shorten the depth of decoder LLM inference (CQIL, layer skipping, layer pruning)."""

import os

__version__ = "0.1.0"

# torch's CPU allocations of 2 MB and more on transparent huge pages. torch reads this once, at
# its first allocation, so it only takes effect when cqil is imported before torch (the `cqil`
# command); a value the user set is kept (THP_MEM_ALLOC_ENABLE=0 turns it off). Why: glibc
# keeps the freed activations of tuning fragmented in its heap; measured on the 2-core CPU
# (docs/runtime.md, "Memory"), the default model's convert peaked at 3.56 GB without, 2.23 with.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def _register_converted_architecture() -> None:
    # Importing cqil makes `model_type: cqil` folders loadable without trust_remote_code.
    try:
        from .runtime.checkpoint import register_auto_classes
    except ImportError:  # runtime not built yet, or torch missing
        return
    register_auto_classes()


_register_converted_architecture()
