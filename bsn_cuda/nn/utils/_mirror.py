"""Makes ``bsn_cuda.nn.utils`` a mirror of ``torch.nn.utils``: every name and
submodule that bsn_cuda does not replace is torch's own object.

Names resolve through the package's module ``__getattr__`` (PEP 562).
Submodules (``bsn_cuda.nn.utils.rnn``, ``.parametrize``, ``.prune``, ...) are
torch's module objects under our name: those torch has loaded are entered in
``sys.modules`` at import (so that importing one never rebinds a package
attribute such as ``weight_norm``, which is a function, as in torch), the rest
through a meta path finder when first imported.
"""

import importlib
import importlib.abc
import importlib.util
import sys

__all__ = ["install"]


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target):
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self.torch_spec = module.__spec__
        return module

    def exec_module(self, module):
        # torch's module, already executed. The import system has just set its
        # __spec__ to ours (it always does): give torch's back.
        module.__spec__ = self.torch_spec


class _TorchSubmoduleFinder(importlib.abc.MetaPathFinder):
    """``<ours>.<name>`` -> ``<torch's>.<name>`` for submodules without a file of ours."""

    def __init__(self, ours, torch_name):
        self.prefix = ours + "."
        self.torch_prefix = torch_name + "."

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(self.prefix):
            return None
        target_name = self.torch_prefix + fullname[len(self.prefix):]
        if importlib.util.find_spec(target_name) is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(target_name))


def install(ours, torch_module, replaced):
    """Alias ``torch_module``'s loaded submodules under the package ``ours``
    (except the ``replaced`` names, which are ours) and the rest on import."""
    torch_name = torch_module.__name__
    for name, module in list(sys.modules.items()):
        if name.startswith(torch_name + "."):
            child = name[len(torch_name) + 1:]
            if child.split(".", 1)[0] not in replaced:
                sys.modules.setdefault(f"{ours}.{child}", module)
    if not any(isinstance(f, _TorchSubmoduleFinder) and f.prefix == ours + "." for f in sys.meta_path):
        sys.meta_path.append(_TorchSubmoduleFinder(ours, torch_name))
