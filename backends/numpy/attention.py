"""kvquant.attention for NumPy arrays: the float64 reference itself
(kvquant.attention.reference_attention, float64 out), so that the reference backend
answers every call with what the other frameworks' attention is measured against."""
from __future__ import annotations


def attend(query, keys, values, scale: float, causal: bool, mask, compiled: bool, chunk_tokens: int):
    from kvquant.attention import reference_attention

    return reference_attention(query, keys, values, scale=scale, causal=causal, mask=mask)
