"""Batch-invariant arithmetic on CPU: a batch whose every item computes what it computes alone.

Batched greedy decoding and batched SAM2 decodes are what make the shared evaluation path cheap, but a
GEMM over B rows blocks (hence rounds) differently from a GEMM over one row, and a masked attention over
ragged rows reduces over the longest row. The shared path promises the naive path's masks bit for bit
on CPU float32, so there it runs its batches under :class:`RowExact`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class RowExact(TorchFunctionMode):
    """Batch-invariant arithmetic (CPU): while active, each item of a batch computes bit for bit what
    it computes in a batch of its own, whatever else is in the batch.

    * ``F.linear`` runs as one GEMM per batch item (``baddbmm`` over the leading dimension; a 2-D input
      is a batch of single rows) -- the GEMM shape a batch of one uses -- instead of one GEMM over all
      rows, whose blocking (hence rounding) depends on the number of rows;
    * with ``key_lengths`` (one-token decoding steps over a RaggedKVCache), ``F.scaled_dot_product_attention``
      runs row by row on each row's own ``key_lengths[b]`` keys without a mask -- what a single-prompt
      step runs -- instead of one masked call whose reductions depend on the longest row.

    Norms, activations, rotary embeddings, lookups and per-item attention are already batch-invariant.
    Used by ``generate_answers(exact=True)`` (batched greedy decoding equal to ``generate_answer``) and by
    :meth:`VideoContext.decode_pairs` (SAM2 decodes that do not depend on the other pairs of their chunk,
    so single (frame, prompt) results can be cached and reused across decode plans).
    """

    def __init__(self, key_lengths: Optional[Sequence[int]] = None):
        super().__init__()
        self.key_lengths = None if key_lengths is None else [int(n) for n in key_lengths]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return self._linear(*args, **kwargs)
        if func is F.scaled_dot_product_attention and self.key_lengths is not None:
            return self._attention(*args, **kwargs)
        return func(*args, **kwargs)

    @staticmethod
    def _linear(x, weight, bias=None):
        if x.dim() < 2:
            return F.linear(x, weight, bias)
        rows = x.shape[0]
        x3 = x.reshape(rows, -1, x.shape[-1])
        wt = weight.t().expand(rows, weight.shape[1], weight.shape[0])
        if bias is None:
            out = torch.bmm(x3, wt)
        else:
            out = torch.baddbmm(bias.expand(rows, 1, bias.shape[0]), x3, wt)
        return out.reshape(*x.shape[:-1], weight.shape[0])

    def _attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        lengths = self.key_lengths
        if query.dim() != 4 or query.shape[-2] != 1 or query.shape[0] != len(lengths) or is_causal or dropout_p:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale, **kw)
        return self.sdpa_rows(query, key, value, lengths, scale=scale, **kw)

    @staticmethod
    def sdpa_rows(query, key, value, lengths: Sequence[int], attn_mask=None, scale=None, **kw) -> torch.Tensor:
        """SDPA row by row on each row's first ``lengths[b]`` keys (and its slice of ``attn_mask``, if
        given): the call a row makes alone, whatever the other rows' lengths. [B, heads, q, head_dim]."""
        rows = []
        for b, n in enumerate(lengths):
            mask = None if attn_mask is None else attn_mask[b:b + 1, :, :, :n]
            rows.append(F.scaled_dot_product_attention(query[b:b + 1].contiguous(), key[b:b + 1, :, :n],
                                                       value[b:b + 1, :, :n], attn_mask=mask, scale=scale, **kw))
        return torch.cat(rows)
