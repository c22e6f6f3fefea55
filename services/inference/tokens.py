"""Counting a request's prompt tokens at the gateway, to price admission before the call.

Text is counted with the model's own tokenizer (`tokenizer.json`, loaded with the light
`tokenizers` library, never transformers or vLLM). An image costs what Phi-3.5-vision's HD
transform makes of it: the engine counts the same, and settlement corrects any gap.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cachetools import LRUCache

from services.catalog.models import PoolConfig
from services.errors import InvalidRequest, ServiceUnavailable
from services.pools.engine import GenerationRequest

logger = logging.getLogger(__name__)

# Role markers and <|end|> around each chat message, plus <|assistant|>\n at the end.
TOKENS_PER_MESSAGE = 4
TOKENS_PER_PROMPT = 2
CHARS_PER_TOKEN_FALLBACK = 3
TILE = 336
# Tokenising ~16 K characters takes about a millisecond: longer prompts (up to the 16 MiB
# body limit) and image headers are counted on a small thread pool, so one tenant's huge
# prompt does not stall every other request on the gateway's event loop (issue 9, item 4).
# Short prompts stay on the loop, where a thread hop would cost more than the count.
OFF_LOOP_CHARS = 16 * 1024
COUNTING_THREADS = 2
# Characters of text whose counts a replica keeps (TextCounts): ~4-16 MB of Python strings.
COUNT_CACHE_CHARS = 4 * 1024 * 1024
COUNT_CACHE_ENTRY_CHARS = 100  # what an entry costs beside its text, in characters


def phi3v_image_tokens(width: int, height: int, num_crops: int) -> int:
    """Image tokens of Phi-3(.5)-vision: HD resize to at most num_crops 336 tiles, 144 per
    tile plus the global tile, and 12 separators per tile row (from the model's processor;
    services/local/tiny_image_processor.py must stay standalone, hence this copy)."""
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * TILE)
    new_h = int(math.ceil(int(new_w / ratio) / TILE) * TILE)
    if transposed:
        new_w, new_h = new_h, new_w
    return int(((new_h // TILE) * (new_w // TILE) + 1) * 144 + 1 + (new_h // TILE + 1) * 12)


class TextCounts:
    """Token counts of the texts a replica counted lately, per tenant and pool (issue 12).

    A chat request carries its whole conversation, so each turn counts every earlier
    message again: ~0.5 us per character with the tiny models' tokenizer, which like Phi's
    does not split the text into words first (a 6 KB history is ~3 ms of the event loop on
    every turn). Keyed by the tenant's prefix-cache salt, like the pools' prefix cache: a
    tenant cannot tell from the timing whether another tenant sent a text. Least recently
    used texts go first once `max_chars` of text are held; a text longer than a sixteenth
    of that is never kept. Thread-safe: long prompts are counted on the counting threads."""

    def __init__(self, max_chars: int = COUNT_CACHE_CHARS) -> None:
        self._counts: LRUCache[tuple[str, str, str], tuple[int, int]] = LRUCache(
            maxsize=max_chars, getsizeof=lambda entry: entry[1]
        )
        self._longest = max_chars // 16
        self._lock = threading.Lock()

    def get(self, salt: str, pool: str, text: str) -> int | None:
        with self._lock:
            entry = self._counts.get((salt, pool, text))
        return None if entry is None else entry[0]

    def has(self, salt: str, pool: str, text: str) -> bool:
        with self._lock:
            return (salt, pool, text) in self._counts  # a peek: not a use

    def put(self, salt: str, pool: str, text: str, count: int) -> None:
        if len(text) <= self._longest:
            with self._lock:
                self._counts[(salt, pool, text)] = (count, len(text) + COUNT_CACHE_ENTRY_CHARS)

    @property
    def chars(self) -> int:
        return int(self._counts.currsize)


class TokenCounter:
    def __init__(
        self,
        tokenizers: dict[str, Any],
        num_crops: dict[str, int],
        *,
        off_loop_chars: int = OFF_LOOP_CHARS,
        text_counts: TextCounts | None = None,
    ) -> None:
        self._tokenizers = tokenizers
        self._num_crops = num_crops
        self._off_loop_chars = off_loop_chars
        self._text_counts = text_counts or TextCounts()
        # Threads start on first use; the tokenizers library releases the GIL while encoding.
        self._executor = ThreadPoolExecutor(max_workers=COUNTING_THREADS, thread_name_prefix="tokens")
        # The longest vocabulary entry bounds the characters one token can cover: a prompt
        # longer than max_model_len of them cannot fit, and is refused without tokenising
        # (encoding costs ~10 us per character here; a 16 MiB prompt would hold a thread
        # for minutes).
        self._longest_token = {
            name: max(map(len, tok.get_vocab())) for name, tok in tokenizers.items() if tok is not None
        }

    @classmethod
    def for_pools(cls, pools: list[PoolConfig], model_dir: Path) -> TokenCounter:
        loaded: dict[str, Any] = {}
        crops: dict[str, int] = {}
        by_path: dict[str, Any] = {}
        for pool in pools:
            path = pool.resolve_model_path(model_dir)
            if path not in by_path:  # a short and a long pool share one model
                by_path[path] = _load_tokenizer(path)
            loaded[pool.name] = by_path[path]
            crops[pool.name] = int((pool.engine.mm_processor_kwargs or {}).get("num_crops", 4))
        return cls(loaded, crops)

    async def count(self, pool: PoolConfig, request: GenerationRequest) -> int:
        """`prompt_tokens`, off the event loop when the text still to encode (what the
        tenant's earlier requests did not count already) is long, or with images."""
        if request.images or self._uncounted_length(pool, request) > self._off_loop_chars:
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, functools.partial(self.prompt_tokens, pool, request, batch=True)
            )
        return self.prompt_tokens(pool, request)

    def cannot_fit(self, pool: PoolConfig, request: GenerationRequest) -> bool:
        """True when the prompt has more characters than the context could hold as tokens."""
        longest = self._longest_token.get(pool.name)
        prompts = len(request.prompts) if request.prompts is not None else 1
        return longest is not None and _text_length(request) > longest * pool.context_len * prompts

    def exact(self, pool: PoolConfig) -> bool:
        """Counted with the model's own tokenizer (not estimated from the text's length)."""
        return self._tokenizers.get(pool.name) is not None

    def decode(
        self, pool: PoolConfig, token_ids: tuple[int, ...] | list[int], *, param: str = "prompt"
    ) -> str:
        """Token ids as text, with the model's own tokenizer; `param` names the ids in a 400."""
        tokenizer = self._tokenizer(pool)
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        if any(not 0 <= i < vocab for i in token_ids):
            raise InvalidRequest(f"token ids must be in [0, {vocab})", param=param)
        return str(tokenizer.decode(list(token_ids), skip_special_tokens=False))

    async def encode(self, pool: PoolConfig, text: str, *, add_special_tokens: bool) -> list[int]:
        """A text's token ids as the engine makes them of a text prompt (off the event loop
        when the text is long, as `count`)."""
        tokenizer = self._tokenizer(pool)
        if len(text) > self._off_loop_chars:
            encoding = await asyncio.get_running_loop().run_in_executor(
                self._executor,
                functools.partial(tokenizer.encode, text, add_special_tokens=add_special_tokens),
            )
        else:
            encoding = tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return list(encoding.ids)

    def token_strings(self, pool: PoolConfig, token_ids: list[int]) -> list[str]:
        """Each token's vocabulary entry (e.g. '▁Once'), as vLLM's `return_token_strs`."""
        tokenizer = self._tokenizer(pool)
        return [str(tokenizer.id_to_token(i)) for i in token_ids]

    def _tokenizer(self, pool: PoolConfig) -> Any:
        tokenizer = self._tokenizers.get(pool.name)
        if tokenizer is None:
            raise ServiceUnavailable(f"model '{pool.served_names[0]}' has no tokenizer at the gateway")
        return tokenizer

    def prompt_tokens(self, pool: PoolConfig, request: GenerationRequest, *, batch: bool = False) -> int:
        """`batch`: the texts as one `encode_batch` (long prompts, on a counting thread: the
        library spreads the texts over its own threads). Short prompts are encoded one text at
        a time on the calling thread: `encode_batch` hands even one short text to that thread
        pool and waits for it, ~45 us of wall time where `encode` takes ~16 (issue 12)."""
        texts, overhead = _texts(request)
        tokenizer = self._tokenizers.get(pool.name)
        if tokenizer is None:
            count = sum(len(t) for t in texts) // CHARS_PER_TOKEN_FALLBACK + 1
        else:
            count = self._encoded_length(pool, request.cache_salt, texts, tokenizer, batch=batch)
        return count + overhead + sum(self._image_tokens(pool, blob) for blob in request.images)

    def _encoded_length(
        self, pool: PoolConfig, salt: str | None, texts: list[str], tokenizer: Any, *, batch: bool
    ) -> int:
        """Tokens of `texts`, each encoded once per tenant (`salt`) while its count is cached."""
        if salt is None:  # no tenant to key the counts by
            return sum(_encode(tokenizer, texts, batch=batch))
        total = 0
        missing: list[str] = []
        for text in texts:
            known = self._text_counts.get(salt, pool.name, text)
            if known is None:
                missing.append(text)
            else:
                total += known
        counts = _encode(tokenizer, missing, batch=batch)
        for text, count in zip(missing, counts, strict=True):
            self._text_counts.put(salt, pool.name, text, count)
        return total + sum(counts)

    def _uncounted_length(self, pool: PoolConfig, request: GenerationRequest) -> int:
        """Characters of the prompt's texts not in the tenant's cached counts."""
        texts, _ = _texts(request)
        salt = request.cache_salt
        if salt is None or self._tokenizers.get(pool.name) is None:
            return sum(map(len, texts))
        return sum(len(t) for t in texts if not self._text_counts.has(salt, pool.name, t))

    def _image_tokens(self, pool: PoolConfig, blob: bytes) -> int:
        from PIL import Image

        try:
            # Reads the header only; decoding happens in the pool.
            width, height = Image.open(io.BytesIO(blob)).size
        except Exception:  # noqa: BLE001 - any unreadable image: the pool refuses it with a clear 400
            return 0
        return phi3v_image_tokens(width, height, self._num_crops[pool.name])


def _encode(tokenizer: Any, texts: list[str], *, batch: bool) -> list[int]:
    """Each text's token count, as the engine counts a text (no special tokens added)."""
    if batch:
        return [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return [len(tokenizer.encode(text, add_special_tokens=False).ids) for text in texts]


def _texts(request: GenerationRequest) -> tuple[list[str], int]:
    """The prompt's texts, and the tokens it costs besides them (chat markers, token-id prompts)."""
    if request.prompts is not None:
        texts = [p for p in request.prompts if isinstance(p, str)]
        return texts, sum(len(p) for p in request.prompts if not isinstance(p, str))
    if request.messages is None:
        return [], 0
    return [m.text for m in request.messages], TOKENS_PER_MESSAGE * len(request.messages) + TOKENS_PER_PROMPT


def _text_length(request: GenerationRequest) -> int:
    if request.prompts is not None:
        return sum(len(p) for p in request.prompts if isinstance(p, str))
    if request.messages is None:
        return 0
    return sum(len(m.text) for m in request.messages)


def _load_tokenizer(model: str) -> Any:
    from tokenizers import Tokenizer

    path = Path(model) / "tokenizer.json"
    try:
        if not path.is_file():
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model, "tokenizer.json"))
        # As transformers 5 loads it (tokenization_utils_base: with a tokenizer.json,
        # tokenizer_config.json's add_bos_token/add_eos_token are dropped): the special tokens
        # an encoding adds are the file's post-processor's, for the engine as here.
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - counted approximately; settlement uses the engine's count
        logger.warning("no tokenizer.json for %s (%s); estimating prompt tokens from length", model, exc)
        return None
