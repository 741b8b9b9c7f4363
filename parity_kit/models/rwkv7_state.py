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

    @classmethod
    def stack(cls, states: list[RWKV7State]) -> RWKV7State:
        """One state whose batch rows are those of ``states``, in order (prompts prefilled apart, decoded together).

        >>> a, b = RWKV7State(1), RWKV7State(1)
        >>> a.wkv[0], b.wkv[0] = torch.zeros(1, 2, 4, 4), torch.ones(2, 2, 4, 4)
        >>> RWKV7State.stack([a, b]).wkv[0].shape
        torch.Size([3, 2, 4, 4])
        """
        merged = cls(len(states[0]))
        for name in ("attn_x", "wkv", "ffn_x"):
            layers = zip(*(getattr(state, name) for state in states))
            setattr(merged, name, [None if any(t is None for t in ts) else torch.cat(ts, dim=0) for ts in layers])
        merged.seen_tokens = max(state.seen_tokens for state in states)
        return merged

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search)."""
        for store in (self.attn_x, self.wkv, self.ffn_x):
            for i, t in enumerate(store):
                if t is not None:
                    store[i] = t.index_select(0, beam_idx.to(t.device))
