"""lmkit: a folder of text in, a trained, evaluated and published GPT-2-class language model out.

`import lmkit` is enough for `AutoConfig` / `AutoModelForCausalLM` to read a directory whose config.json says
model_type "lmkit" (no trust_remote_code is involved), yet it imports neither torch nor transformers itself:
`lmkit --help` must stay fast, and torch alone takes seconds to import. The Auto classes are registered as soon as
transformers is imported, by whoever imports it; the public names below load their modules on first use, the Python API
(`lmkit.train(lmkit.load_recipe(...))`, `lmkit.evaluate`, `lmkit.push`, `lmkit.export`, `lmkit.generate`) included.
"""

import importlib
import importlib.abc
import importlib.util
import logging
import sys

__version__ = "0.1.0"

# The Python API sits beside the model classes. No module of this package may be named like one of its functions:
# once imported, a submodule `lmkit/train.py` would replace `lmkit.train` (hence lmkit.exporting, not lmkit.export).
_LAZY = {
    "LmkitConfig": "lmkit.configuration",
    "LmkitForCausalLM": "lmkit.modeling",
    "load_model": "lmkit.loading",
    "load_tokenizer": "lmkit.loading",
    **dict.fromkeys(["TrainResult", "evaluate", "export", "generate", "load_recipe", "push", "train"], "lmkit.api"),
}
__all__ = ["LmkitConfig", "LmkitForCausalLM", "TrainResult", "__version__", "evaluate", "export", "generate",
           "load_model", "load_recipe", "load_tokenizer", "push", "train"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmkit' has no attribute {name!r}")


_deferred = False  # transformers was first imported by lmkit.configuration itself: register when it has loaded


def _register_auto_classes() -> None:
    """Import lmkit.modeling, whose import registers LmkitConfig and LmkitForCausalLM with the Auto classes."""
    global _deferred
    if any(_initializing(name) for name in ("lmkit.configuration", "lmkit.modeling")):
        _deferred = True  # their classes are not defined yet; lmkit.configuration finishes this at its end
        return
    _deferred = False
    importlib.import_module("lmkit.modeling")


def _finish_deferred_registration() -> None:
    """Called at the end of lmkit.configuration, whose classes now exist (lmkit.modeling registers at its own end)."""
    global _deferred
    if _deferred and not _initializing("lmkit.modeling"):
        _deferred = False
        importlib.import_module("lmkit.modeling")


def _initializing(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False)


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Finds `transformers` with the other finders and wraps its loader in `_RegisteringLoader`."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)  # once: from now on transformers loads like any package
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    """transformers' own loader, plus the registration of lmkit's Auto classes once the package has loaded."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):  # get_resource_reader, is_package, ...: the real loader's
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            _register_auto_classes()
        except Exception as error:  # e.g. no torch: transformers itself works, lmkit models cannot load anyway
            logging.getLogger(__name__).debug("lmkit Auto classes not registered: %s", error)


if "transformers" in sys.modules:
    _register_auto_classes()
else:
    sys.meta_path.insert(0, _RegisterAfterTransformers())
