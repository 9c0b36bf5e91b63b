"""Activation checkpointing with SN layers: the selective-checkpoint context.

How the parametrizations handle plain checkpointing (no second update in the
recomputation) is in :mod:`bsn_cuda._context` (``in_backward_pass``).
"""

import torch

from .. import _ops

__all__ = ["spectral_norm_checkpoint_context"]


def _save_spectral_norm_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    if op in _ops.FORWARD_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def spectral_norm_checkpoint_context():
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint`` that keeps the SN/BSN ops out of the recomputation.

    Usage: ``checkpoint(block, x, use_reentrant=False, context_fn=bsn_cuda.nn.spectral_norm_checkpoint_context)``.

    Selective activation checkpointing that saves the outputs of the fused
    SN/BSN ops (the normalized weight and the small state) and recomputes
    everything else. The backward then uses
    exactly the state of the real forward, so gradients equal those of the
    run without checkpointing bit for bit, also when a layer runs several
    training forwards before one backward (GAN: D(real), D(fake)), and under
    ``torch.compile``, whose partitioner would otherwise recompute the op from
    the already-updated buffers (silently wrong gradients, a torch issue).
    Plain checkpointing in eager mode is handled without it (the recomputation
    does not update the vectors again and evaluates sigma from them): gradients
    equal to rounding for one training forward per backward; with several, the
    recomputation of the earlier ones uses the latest vectors. Needs torch >=
    2.5 (for ``create_selective_checkpoint_contexts``; a RuntimeError says so
    on older torch) and the compiled ops (the reference fallback is
    recomputed, which is still correct in eager mode).
    """
    try:
        from torch.utils.checkpoint import create_selective_checkpoint_contexts
    except ImportError as exc:  # torch < 2.5
        raise RuntimeError(
            "spectral_norm_checkpoint_context: expected torch >= 2.5 "
            "(torch.utils.checkpoint.create_selective_checkpoint_contexts), "
            f"got torch {torch.__version__}; plain checkpointing works without it"
        ) from exc
    return create_selective_checkpoint_contexts(_save_spectral_norm_policy)
