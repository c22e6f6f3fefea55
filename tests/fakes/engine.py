"""`FakeEngine`: the `Engine` contract of services/pools/engine.py without vLLM.

What it keeps from the real engine (services/pools/vllm_engine.py), so the gateway code
above it meets the same behaviour:

* the prompt is rendered by the real `PromptRenderer` (roles, `<|image_N|>` placeholders)
  with Phi-3's chat format, and `prompt_tokens` is the engine's own count of that text
  (plus Phi-3.5-vision's image tokens), so it differs from the gateway's estimate as the
  real count does;
* validation before the first chunk: images to a text model, undecodable images and a
  prompt plus `max_tokens` beyond `max_model_len` raise `InvalidRequest` subclasses;
* deltas with running token counts; the last chunk carries `finish_reason`: "length" at
  `max_tokens`, "stop" at a stop string (cut before it, as vLLM does) or at the natural
  end (an end-of-sequence token, unless `ignore_eos`);
* `cached_tokens`: a prefix cache per `cache_salt`, in blocks, never the whole prompt;
* a fresh engine request id per generation; a generation closed or cancelled before its
  last chunk is aborted (`aborted` lists the ids) and leaves `num_unfinished()`.

The text is deterministic: the words of the last message (or of the prompt), each a token
(" word"), once, then the end-of-sequence (cycling instead under `ignore_eos`). A prompt
without words answers " ok".

Tests steer it through plain attributes: `pause()`/`resume()` hold generations before
their first token (requests in flight, on demand), `token_delay_s` spaces tokens,
`fail_after_tokens` raises `GenerationFailed` mid-stream, `dead` makes it a dead engine.
"""

from __future__ import annotations

import asyncio
import io
import re
import uuid
from collections.abc import AsyncIterator

from services.catalog.models import Modality, PoolConfig
from services.errors import ContextLengthExceeded, GenerationFailed, InvalidRequest, ServiceUnavailable
from services.inference.tokens import phi3v_image_tokens
from services.pools.engine import Engine, GenerationChunk, GenerationRequest
from services.pools.prompts import PromptRenderer, decode_images

# vLLM's KV block: a prefix is cached (and reported) in whole blocks only.
CACHE_BLOCK_TOKENS = 16
_TOKEN = re.compile(r"<\|\w+\|>|\w+|[^\w\s]")
_WORD = re.compile(r"\w+")
_IMAGE_TAG = re.compile(r"<\|image_\d+\|>")


def fake_tokens(text: str) -> list[str]:
    """The fake engine's tokenizer: special tokens, words and punctuation marks."""
    return _TOKEN.findall(text)


class PhiChatFormat:
    """Phi-3's chat template (services/local/tiny_tokenizer.py CHAT_TEMPLATE), as the one
    method `PromptRenderer` calls on a tokenizer."""

    def apply_chat_template(
        self, conversation: list[dict[str, str]], *, tokenize: bool, add_generation_prompt: bool
    ) -> str:
        assert not tokenize, "the renderer asks for text"
        parts = []
        for message in conversation:
            role, text = message["role"], message["content"]
            if role == "system" and text:
                parts.append(f"<|system|>\n{text}<|end|>\n")
            elif role in ("user", "assistant"):
                parts.append(f"<|{role}|>\n{text}<|end|>\n")
            # Any other role is dropped, as the real template does.
        parts.append("<|assistant|>\n" if add_generation_prompt else "<|endoftext|>")
        return "".join(parts)


class FakeEngine(Engine):
    def __init__(self, pool: PoolConfig, *, model_path: str = "") -> None:
        self.pool = pool
        self.model_path = model_path
        self.started = False
        self.shut_down = False
        # Steering (set by tests).
        self.dead = False
        self.token_delay_s = 0.0
        self.fail_after_tokens: int | None = None
        self._go = asyncio.Event()
        self._go.set()
        # What happened (read by tests).
        self.requests: list[GenerationRequest] = []
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self._running: set[str] = set()
        self._cache: dict[str | None, list[tuple[str, ...]]] = {}
        self._renderer = PromptRenderer(PhiChatFormat(), modality=pool.modality)

    # -- steering ---------------------------------------------------------------------

    def pause(self) -> None:
        """Hold every generation (new and waiting) before its first token."""
        self._go.clear()

    def resume(self) -> None:
        self._go.set()

    @property
    def running(self) -> int:
        return len(self._running)

    # -- the Engine contract ----------------------------------------------------------

    async def start(self) -> None:
        self.started = True

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if self.dead:
            raise ServiceUnavailable("the model engine is not running; retry shortly")
        self.requests.append(request)
        prompt = self._renderer.render(request)
        prompt_tokens = self._prompt_tokens(prompt, request)
        s = request.sampling
        limit = self.pool.engine.max_model_len
        if s.max_tokens is not None and prompt_tokens + s.max_tokens > limit:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_tokens + s.max_tokens} tokens ({prompt_tokens} in the prompt, "
                f"{s.max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                param="max_tokens",
            )
        cached_tokens = self._cached_tokens(request.cache_salt, tuple(fake_tokens(prompt)))
        max_tokens = s.max_tokens if s.max_tokens is not None else max(limit - prompt_tokens, 1)
        source = _WORD.findall(_last_text(request)) or ["ok"]
        engine_request_id = uuid.uuid4().hex
        self._running.add(engine_request_id)
        finished = False
        text = ""  # everything generated so far (stop strings are searched in it)
        sent = 0  # characters of `text` already sent
        try:
            await self._go.wait()
            for n in range(1, max_tokens + 1):
                await asyncio.sleep(self.token_delay_s)
                if self.dead:
                    raise ServiceUnavailable("the model engine is not running; retry shortly")
                if self.fail_after_tokens is not None and n > self.fail_after_tokens:
                    raise GenerationFailed("the engine failed to generate a response")
                text += f" {source[(n - 1) % len(source)]}"
                finish: str | None = None
                stop_at = _first_stop(text, s.stop, sent)
                if stop_at is not None:
                    # Never take back text already sent (vLLM holds back a possible stop prefix).
                    text, finish = text[: max(stop_at, sent)], "stop"
                elif n == len(source) and not s.ignore_eos:
                    finish = "stop"  # the end-of-sequence token
                elif n == max_tokens:
                    finish = "length"
                delta, sent = text[sent:], len(text)
                finished = finish is not None
                yield GenerationChunk(
                    text=delta,
                    completion_tokens=n,
                    prompt_tokens=prompt_tokens,
                    finish_reason=finish,
                    cached_tokens=cached_tokens,
                )
                if finished:
                    return
        finally:
            self._running.discard(engine_request_id)
            (self.finished if finished else self.aborted).append(engine_request_id)

    async def check_health(self) -> None:
        if self.dead or not self.started:
            raise ServiceUnavailable("the model engine is not running")

    async def num_unfinished(self) -> int:
        return len(self._running)

    def shutdown(self) -> None:
        self.shut_down = True

    # -- internals --------------------------------------------------------------------

    def _prompt_tokens(self, prompt: str, request: GenerationRequest) -> int:
        if request.images and self.pool.modality is not Modality.vision:
            raise InvalidRequest("this model does not accept images", param="messages")
        images = decode_images(request.images)  # the real decoder: same 400s for bad images
        num_crops = int((self.pool.engine.mm_processor_kwargs or {}).get("num_crops", 4))
        image_tokens = sum(phi3v_image_tokens(*image.size, num_crops) for image in images)
        # Each <|image_N|> placeholder becomes the image's tokens.
        return len(fake_tokens(_IMAGE_TAG.sub("", prompt))) + image_tokens

    def _cached_tokens(self, salt: str | None, tokens: tuple[str, ...]) -> int:
        """Tokens of the longest prefix shared with an earlier prompt of the same salt, in
        whole blocks, and never the last prompt token (the engine always computes one)."""
        seen = self._cache.setdefault(salt, [])
        best = 0
        for earlier in seen:
            common = 0
            for a, b in zip(earlier, tokens, strict=False):
                if a != b:
                    break
                common += 1
            best = max(best, common)
        seen.append(tokens)
        return min(best, len(tokens) - 1) // CACHE_BLOCK_TOKENS * CACHE_BLOCK_TOKENS


def _last_text(request: GenerationRequest) -> str:
    if request.messages:
        return request.messages[-1].text
    return request.prompt or ""


def _first_stop(text: str, stops: tuple[str, ...], sent: int) -> int | None:
    """Where the first stop string starts, looking only where it could newly appear."""
    found = [i for stop in stops if stop and (i := text.find(stop, max(sent - len(stop), 0))) >= 0]
    return min(found) if found else None


def fake_engine_factory(pool: PoolConfig, model_path: str) -> FakeEngine:
    """An `EngineFactory` (services/pools/deployment.py) for `PoolReplica`."""
    return FakeEngine(pool, model_path=model_path)


def image_bytes(width: int = 64, height: int = 48) -> bytes:
    """A small PNG, for image requests."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


__all__ = ["CACHE_BLOCK_TOKENS", "FakeEngine", "PhiChatFormat", "fake_engine_factory", "fake_tokens"]
