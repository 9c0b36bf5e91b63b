"""Whole-model pickling of parametrized modules (torch.save(model), copy.copy, deepcopy).

torch.nn.utils.parametrize swaps the module's class for a generated subclass
that cannot be pickled by reference and refuses to pickle (its __getstate__
raises). For modules we parametrize, pickle the plain class plus the module's
__dict__ instead and regenerate the subclass and its properties on load.
"""

from torch.nn.utils import parametrize

__all__ = ["make_picklable"]


def _rebuild_parametrized(base_cls, tensor_names):
    module = base_cls.__new__(base_cls)
    parametrize._inject_new_class(module)
    for tensor_name in tensor_names:
        parametrize._inject_property(module, tensor_name)
    make_picklable(module)
    return module  # pickle then restores __dict__ through nn.Module.__setstate__


def _reduce_parametrized(self, protocol=2):
    base_cls = type(self).__bases__[0]
    names = tuple(self.__dict__["_modules"]["parametrizations"].keys())
    return _rebuild_parametrized, (base_cls, names), self.__dict__.copy()


def make_picklable(module):
    cls = type(module)
    if not hasattr(parametrize, "_inject_new_class") or not hasattr(parametrize, "_inject_property"):
        return  # pragma: no cover - keep torch's behaviour if its internals change
    if cls.__dict__.get("__reduce_ex__") is not _reduce_parametrized:
        cls.__reduce_ex__ = _reduce_parametrized
