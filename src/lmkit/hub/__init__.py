"""The local model hub: named models with immutable, verified revisions in a plain directory (the HF cache layout).

    store.py       the layout, names, manifests, revisions, `main`, verification and `resolve`
    publish.py     `push`: a run, checkpoint or tokenizer directory becomes a new revision
    manage.py      list, show, delete, verify, gc
    model_card.py  the README.md each revision carries

Loading models and tokenizers by name is `lmkit.loading`'s; `from lmkit.hub import load_model`, which every pushed
model card shows, still works (resolved on first use: `lmkit.loading` itself builds on this package).
"""

import importlib

from lmkit.hub.manage import GC_GRACE_SECONDS, delete, gc, list_models, show, verify
from lmkit.hub.publish import push
from lmkit.hub.store import (
    MANIFEST,
    PUSH_MODES,
    SHORT_REVISION,
    HubArgs,
    hub_dir,
    refuse_inside_hub,
    resolve,
    revision_containing,
    validate_name,
)

__all__ = [
    "GC_GRACE_SECONDS", "MANIFEST", "PUSH_MODES", "SHORT_REVISION", "HubArgs", "delete", "gc", "hub_dir",
    "list_models", "load_model", "load_tokenizer", "push", "refuse_inside_hub", "resolve", "revision_containing",
    "show", "validate_name", "verify",
]


def __getattr__(name: str):
    if name in ("load_model", "load_tokenizer"):
        return getattr(importlib.import_module("lmkit.loading"), name)
    raise AttributeError(f"module 'lmkit.hub' has no attribute {name!r}")
