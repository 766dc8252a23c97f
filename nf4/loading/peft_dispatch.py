"""peft's dispatch for nf4's layers (``nf4.peft.enable``) once peft is imported, never by importing it.

Note: enabling peft without importing it.
    Every model nf4 makes must be wrapped by peft as nf4's layers (``nf4.peft.enable``), whenever
    its user imports peft. Importing peft to enable it put peft's import inside every
    ``from_pretrained`` call: 0.15-0.3 s on the development VM after transformers, and more where
    bitsandbytes is installed, which peft imports at ``import peft`` (``peft.helpers``: bnb loads
    its CUDA library and Triton). So ``when_imported`` enables at once when peft is already imported
    (nothing to pay), and otherwise puts a finder at the front of ``sys.meta_path`` that waits for
    ``import peft``: it lets the finders after it find peft, and its loader runs peft's own loader,
    hands peft's module that loader back, takes the finder out of ``sys.meta_path`` and enables.
    A ``find_spec("peft")`` that imports nothing (transformers asks it) leaves the finder waiting.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys
import threading

log = logging.getLogger(__name__)

PEFT = "peft"
_lock = threading.Lock()


def _enable() -> None:
    try:
        importlib.import_module("nf4.peft").enable()  # optional dependency: imports peft (imported now)
    except ImportError as e:
        log.warning("peft is imported but nf4.peft cannot enable its dispatch for nf4's layers: %s", e)


class _EnablingLoader(importlib.abc.Loader):
    """peft's own loader, then ``enable()``."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        _remove()
        _enable()


class _PeftFinder(importlib.abc.MetaPathFinder):
    """Finds peft with the finders after it and wraps its loader. It stays in ``sys.meta_path``
    until peft's module has run: a mere ``importlib.util.find_spec("peft")`` (transformers'
    ``is_peft_available``) asks it too, and imports nothing."""

    def find_spec(self, fullname, path, target=None):
        if fullname != PEFT:
            return None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _EnablingLoader(spec.loader)
                return spec
        return None


_finder = _PeftFinder()


def _remove() -> None:
    with _lock:
        if _finder in sys.meta_path:
            sys.meta_path.remove(_finder)


def when_imported() -> None:
    """``nf4.peft.enable()`` now if peft is imported, else as soon as it is (if it is installed)."""
    if PEFT in sys.modules:
        _enable()
        return
    if importlib.util.find_spec(PEFT) is None:
        return
    with _lock:
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
    if PEFT in sys.modules:  # imported by another thread meanwhile
        _remove()
        _enable()


def waiting() -> bool:
    """Whether the finder waits for ``import peft`` (peft installed, not yet imported)."""
    return _finder in sys.meta_path
