"""Checkpoints of the legacy ``torch.nn.utils.spectral_norm`` loaded into the parametrization.

A load-state-dict pre-hook renames ``<name>_orig``, ``<name>_u`` and
``<name>_v`` to the parametrization's keys. Checkpoints written by torch < 1.0
have no ``<name>_v`` but store the normalized weight ``<name>``: ``v`` is then
solved for as torch's legacy loader does (the least-squares ``v`` with
``W v`` parallel to ``u``, rescaled so that ``u^T W v`` is the checkpoint's
sigma, ``mean(W_orig / W_sn)``), so the loaded layer gives the checkpoint's
outputs.
"""

import torch
from torch.nn.utils import parametrize

from .parametrizations import SpectralNorm

__all__ = ["add_legacy_checkpoint_hook", "remove_legacy_checkpoint_hook", "solve_v", "unwrap_hook"]


@torch.no_grad()
def solve_v(weight_mat, u, sigma):
    """``v`` minimizing ``||W v - sigma u||``, rescaled so that ``u^T W v == sigma``."""
    acc = torch.float64 if weight_mat.dtype == torch.float64 else torch.float32
    w = weight_mat.to(acc)
    u_acc = u.to(acc)
    v = torch.linalg.pinv(w.t() @ w) @ (w.t() @ u_acc)
    v = v * (sigma.to(acc) / torch.dot(u_acc, w @ v))
    return v.to(weight_mat.dtype)


class _LegacyCheckpointPreHook:
    """Maps legacy keys to the parametrization's (a with_module load_state_dict pre-hook)."""

    def __init__(self, name):
        self.name = name

    def __call__(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        base = prefix + self.name
        if base + "_orig" not in state_dict or not parametrize.is_parametrized(module, self.name):
            return
        plist = module.parametrizations[self.name]
        index = next((i for i, p in enumerate(plist) if isinstance(p, SpectralNorm)), None)
        if index is None:
            return
        norm = plist[index]
        target = f"{prefix}parametrizations.{self.name}."
        original = state_dict.pop(base + "_orig")
        state_dict[target + "original"] = original
        if base + "_u" in state_dict:
            state_dict[f"{target}{index}._u"] = state_dict.pop(base + "_u")
        if base + "_v" in state_dict:
            state_dict[f"{target}{index}._v"] = state_dict.pop(base + "_v")
        normalized = state_dict.pop(base, None)  # torch < 1.0 also stored W_sn, and no v
        u_key, v_key = f"{target}{index}._u", f"{target}{index}._v"
        if v_key not in state_dict and u_key in state_dict and normalized is not None and original.ndim > 1:
            sigma = (original / normalized).mean()
            w_mat = original.movedim(norm.dim, 0).reshape(original.shape[norm.dim], -1)
            state_dict[v_key] = solve_v(w_mat, state_dict[u_key], sigma)


def unwrap_hook(hook):
    return getattr(hook, "hook", hook)  # torch wraps hooks in _WrappedHook


def add_legacy_checkpoint_hook(module, name):
    for hook in module._load_state_dict_pre_hooks.values():
        inner = unwrap_hook(hook)
        if isinstance(inner, _LegacyCheckpointPreHook) and inner.name == name:
            return
    module._register_load_state_dict_pre_hook(_LegacyCheckpointPreHook(name), with_module=True)


def remove_legacy_checkpoint_hook(module, name):
    for key, hook in list(module._load_state_dict_pre_hooks.items()):
        inner = unwrap_hook(hook)
        if isinstance(inner, _LegacyCheckpointPreHook) and inner.name == name:
            del module._load_state_dict_pre_hooks[key]
