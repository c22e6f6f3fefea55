"""The engine's token log probabilities in OpenAI's two shapes (chat and legacy completions)."""

from __future__ import annotations

from services.inference.protocol.responses import ChatLogprobs, CompletionLogprobs
from services.pools.engine import TokenLogprob


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(tokens: list[TokenLogprob] | None) -> ChatLogprobs | None:
    if tokens is None:
        return None
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": _bytes(t.token),
                "top_logprobs": [{"token": tok, "logprob": lp, "bytes": _bytes(tok)} for tok, lp in t.top],
            }
            for t in tokens
        ]
    }


def completion_logprobs(tokens: list[TokenLogprob] | None, text_offset: int) -> CompletionLogprobs | None:
    """`text_offset`: where the first token starts in the choice's text (after any echo)."""
    if tokens is None:
        return None
    offsets = []
    for t in tokens:
        offsets.append(text_offset)
        text_offset += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top) for t in tokens],
        "text_offset": offsets,
    }
