"""lmkit: a folder of text in, a trained, evaluated and published GPT-2-class language model out.

`import lmkit` is enough for `AutoConfig` / `AutoModelForCausalLM` to read a directory whose config.json says model_type
"lmkit" (no trust_remote_code is involved), yet it imports neither torch nor transformers itself: `lmkit --help` must
stay fast, and torch alone takes seconds to import. The Auto classes are registered as soon as transformers is
imported, by whoever imports it; the public names below load their modules on first use.
"""

import importlib
import importlib.abc
import importlib.util
import logging
import sys

__version__ = "0.1.0"

_LAZY = {
    "LmkitConfig": "lmkit.configuration",
    "LmkitForCausalLM": "lmkit.modeling",
    "load_model": "lmkit.hub",
    "load_tokenizer": "lmkit.hub",
}
__all__ = ["LmkitConfig", "LmkitForCausalLM", "__version__", "load_model", "load_tokenizer"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmkit' has no attribute {name!r}")


def _register_auto_classes() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmkit.configuration import LmkitConfig
    from lmkit.modeling import LmkitForCausalLM

    AutoConfig.register("lmkit", LmkitConfig, exist_ok=True)
    AutoModelForCausalLM.register(LmkitConfig, LmkitForCausalLM, exist_ok=True)


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
