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
from services.pools.engine import Engine, GenerationChunk, GenerationRequest, Prompt, TokenLogprob
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
        prompts = [self._prompt_text(p, request) for p in request.prompts or (None,)]
        prompt_tokens = [self._prompt_tokens(prompt, request) for prompt in prompts]
        s = request.sampling
        limit = self.pool.engine.max_model_len
        for count in prompt_tokens:
            if s.max_tokens is not None and count + s.max_tokens > limit:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {limit} tokens. However, you requested "
                    f"{count + s.max_tokens} tokens ({count} in the prompt, "
                    f"{s.max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                    param="max_tokens",
                )
        cached_tokens = sum(
            self._cached_tokens(request.cache_salt, tuple(fake_tokens(prompt))) for prompt in prompts
        )
        # Choice i*n+j of prompt i: its words, its budget (every choice of a prompt is alike).
        choices = [
            _FakeChoice(i * s.n + j, _WORD.findall(_last_text(request, prompt)) or ["ok"])
            for i, prompt in enumerate(prompts)
            for j in range(s.n)
        ]
        max_tokens = s.max_tokens if s.max_tokens is not None else max(limit - max(prompt_tokens), 1)
        engine_request_id = uuid.uuid4().hex
        self._running.add(engine_request_id)
        finished = False
        generated = 0
        try:
            await self._go.wait()
            for n in range(1, max_tokens + 1):
                await asyncio.sleep(self.token_delay_s)
                if self.dead:
                    raise ServiceUnavailable("the model engine is not running; retry shortly")
                if self.fail_after_tokens is not None and n > self.fail_after_tokens:
                    raise GenerationFailed("the engine failed to generate a response")
                for choice in choices:
                    if choice.done:
                        continue
                    generated += 1
                    delta, finish = choice.step(n, s.stop, max_tokens, ignore_eos=s.ignore_eos)
                    logprobs = None
                    if s.logprobs is not None:
                        logprobs = [
                            TokenLogprob(delta, -0.5, tuple((delta, -0.5) for _ in range(min(s.logprobs, 1))))
                        ]
                    yield GenerationChunk(
                        text=delta,
                        completion_tokens=generated,
                        prompt_tokens=sum(prompt_tokens),
                        finish_reason=finish,
                        cached_tokens=cached_tokens,
                        index=choice.index,
                        logprobs=logprobs,
                    )
                if all(choice.done for choice in choices):
                    finished = True
                    return
        finally:
            self._running.discard(engine_request_id)
            (self.finished if finished else self.aborted).append(engine_request_id)

    def _prompt_text(self, prompt: Prompt | None, request: GenerationRequest) -> str:
        if prompt is None:
            return self._renderer.render(request)
        return prompt if isinstance(prompt, str) else " ".join(f"t{i}" for i in prompt)

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


def _last_text(request: GenerationRequest, prompt: str) -> str:
    if request.messages:
        return request.messages[-1].text
    return prompt


class _FakeChoice:
    """One choice's words, cycled under ignore_eos, and what of it was sent."""

    def __init__(self, index: int, source: list[str]) -> None:
        self.index = index
        self.source = source
        self.text = ""  # everything generated so far (stop strings are searched in it)
        self.sent = 0  # characters of `text` already sent
        self.done = False

    def step(
        self, n: int, stops: tuple[str, ...], max_tokens: int, *, ignore_eos: bool
    ) -> tuple[str, str | None]:
        self.text += f" {self.source[(n - 1) % len(self.source)]}"
        finish: str | None = None
        stop_at = _first_stop(self.text, stops, self.sent)
        if stop_at is not None:
            # Never take back text already sent (vLLM holds back a possible stop prefix).
            self.text, finish = self.text[: max(stop_at, self.sent)], "stop"
        elif n == len(self.source) and not ignore_eos:
            finish = "stop"  # the end-of-sequence token
        elif n == max_tokens:
            finish = "length"
        delta, self.sent = self.text[self.sent :], len(self.text)
        self.done = finish is not None
        return delta, finish


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
