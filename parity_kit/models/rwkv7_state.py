"""The recurrent cache of RWKV-7: what a decode step carries from the previous tokens."""

from __future__ import annotations

import torch


class RWKV7State:
    """Recurrent cache for incremental decoding: per layer the attention and FFN token-shift inputs
    (``[B, C]``) and the WKV state (``[B, H, N, V]``, key index first, FLA layout).

    Passed as ``cache`` (or its old name ``past_key_values``); ``forward(..., use_cache=True)`` returns the
    updated object.

    >>> s = RWKV7State(2)
    >>> s.get_seq_length(), len(s)
    (0, 2)
    """

    def __init__(self, num_layers: int) -> None:
        self.attn_x: list[torch.Tensor | None] = [None] * num_layers
        self.wkv: list[torch.Tensor | None] = [None] * num_layers
        self.ffn_x: list[torch.Tensor | None] = [None] * num_layers
        self.seen_tokens = 0

    def __len__(self) -> int:
        return len(self.wkv)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens consumed so far."""
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search)."""
        for store in (self.attn_x, self.wkv, self.ffn_x):
            for i, t in enumerate(store):
                if t is not None:
                    store[i] = t.index_select(0, beam_idx.to(t.device))
