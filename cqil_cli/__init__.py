"""cqil: shorten the depth of decoder LLM inference (CQIL, layer skipping, layer pruning)."""

import os
import sys

__version__ = "0.1.0"

# torch's CPU allocations of 2 MB and more on transparent huge pages. torch reads this once, at
# its first allocation, so it only takes effect when cqil is imported before torch (the `cqil`
# command); a value the user set is kept (THP_MEM_ALLOC_ENABLE=0 turns it off). Why: glibc
# keeps the freed activations of tuning fragmented in its heap; measured on the 2-core CPU
# (docs/runtime.md, "Memory"), the default model's convert peaked at 3.56 GB without, 2.23 with.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def _register_converted_architecture() -> None:
    """Make `model_type: cqil` folders loadable through transformers' Auto classes without
    trust_remote_code. Importing cqil_cli must stay cheap (`cqil --help` never imports torch),
    so this happens now only when transformers is already loaded, else right after it is first
    imported (_RegisterAfterTransformers); cqil's own loaders also register before they load
    (runtime/checkpoint.py registers when it is imported)."""
    if "transformers" in sys.modules:
        _register_now()
    elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTransformers())


def _register_now() -> None:
    # Not while one of cqil's own modules is half imported (transformers imported from inside
    # it): runtime/checkpoint.py registers when its import completes.
    for name, module in list(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        if name.startswith("cqil_cli.") and getattr(spec, "_initializing", False):
            return
    try:
        from .runtime.checkpoint import register_auto_classes
    except ImportError:  # torch missing
        return
    register_auto_classes()


class _RegisterAfterTransformers:
    """A meta-path finder that wraps transformers' loader: once its module has executed, the
    converted architecture is registered; then the finder removes itself."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        import importlib.util

        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register_now()

        loader.exec_module = exec_then_register
        return spec


_register_converted_architecture()
