"""Ray Serve LLM's OpenAI app on vLLM's CPU backend, set up the way phiserve runs vLLM.

`ray.serve.llm.build_openai_app` (an OpenAiIngress deployment, one handle hop, an LLMServer
deployment holding vLLM's AsyncLLM) is the peer a Ray user would deploy instead of phiserve.
On the CPU backend Ray Serve LLM forces vLLM's `mp` executor (`VLLMEngineConfig.
get_initialization_kwargs` in `ray/llm/_internal/serve/engines/vllm/vllm_models.py`): a worker
process beside the engine core and a shared-memory hop per step, which roughly doubles the
engine's CPU per request (measured: ../shared/design/tooling.md). phiserve's pools and
`vllm serve` run the `uni` executor on one device, so `UniExecutorLLMServer` does too: the
comparison is between the gateway paths, not between executors.

Imported by the driver (to build the app) and by the LLMServer replica (Serve pickles the
server class by reference): the folder of this file must be on the replicas' PYTHONPATH.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
from ray.serve.llm import LLMConfig, LLMServer, build_openai_app


class UniExecutorVLLMEngine(VLLMEngine):
    """vLLM's single-process (`uni`) executor where Ray Serve LLM would pick `mp` for a
    one-device CPU engine. The engine core still runs in its own process (AsyncLLM), as in
    phiserve's pool replica and vLLM's API server."""

    def _prepare_engine_config(self, callback_ctx: Any) -> tuple[Any, Any, Any]:
        from vllm.usage.usage_lib import UsageContext

        engine_args, frontend_args, config = super()._prepare_engine_config(callback_ctx)
        parallel = config.parallel_config
        if parallel.distributed_executor_backend == "mp" and parallel.world_size == 1:
            engine_args = dataclasses.replace(engine_args, distributed_executor_backend="uni")
            config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        return engine_args, frontend_args, config


class UniExecutorLLMServer(LLMServer):
    """Ray Serve LLM's LLMServer with `UniExecutorVLLMEngine` as its engine (`server_cls`)."""

    _default_engine_cls = UniExecutorVLLMEngine


def rayllm_app(
    model_dir: Path, served_name: str, engine_kwargs: dict[str, Any], engine_env: dict[str, str]
) -> Any:
    """The OpenAI app on the CPU backend: one CPU bundle for the engine (no accelerator
    type, so Ray Serve LLM infers the CPU backend), no CPU reserved by the replicas (2 cores
    are shared by three engines), the CPU engine's environment in the server replica.
    Stream batching stays at Ray Serve LLM's default (50 ms, RAYLLM_MODEL_RESPONSE_BATCH_TIMEOUT_MS)."""
    config = LLMConfig(
        model_loading_config={"model_id": served_name, "model_source": str(model_dir)},
        engine_kwargs=dict(engine_kwargs),
        placement_group_config={"bundles": [{"CPU": 1}]},
        runtime_env={"env_vars": dict(engine_env)},
        deployment_config={"ray_actor_options": {"num_cpus": 0}, "num_replicas": 1},
        server_cls=UniExecutorLLMServer,
    )
    return build_openai_app(
        {"llm_configs": [config], "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0}}}
    )
