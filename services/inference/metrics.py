"""Every metric the gateway records, declared in one place.

Exported through Ray's metrics agent: one scrape endpoint per node (Ray's metrics export
port), names prefixed `ray_` by Ray, with Serve's `deployment`/`replica`/`application` tags
added. A `prometheus_client` server per replica would clash on ports when replicas share a
node; Ray's agent already aggregates every process on its node (see docs/operations.md).

Labels are bounded: `model` is a catalog name, `status` an HTTP code, `reason` a fixed set,
and `tenant` is the tenant id only for tenants with `metrics_label: true` (an allow-list
the admin controls), `other` for everyone else; so is `adapter`, a LoRA adapter's name.
"""

from __future__ import annotations

from ray.serve import metrics

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
TOKEN_LATENCY_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56]
OTHER_TENANTS = "other"


# ray.serve.metrics annotates `tag_keys` as Tuple[str] (one name) where ray.util.metrics, which it
# wraps, takes Tuple[str, ...]: the ignores below go when Ray's annotation does.


class GatewayMetrics:
    """Created inside the gateway replica (metrics need a running Ray worker)."""

    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "phiserve_requests_total",
            description="HTTP requests answered by the gateway.",
            tag_keys=("model", "status", "tenant"),  # type: ignore[arg-type]  # Ray annotates Tuple[str]
        )
        self.request_duration = metrics.Histogram(
            "phiserve_request_duration_seconds",
            description="Time from request arrival to the last byte of the response.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("model", "endpoint"),  # type: ignore[arg-type]  # Ray annotates Tuple[str]
        )
        self.time_to_first_token = metrics.Histogram(
            "phiserve_time_to_first_token_seconds",
            description="Time from request arrival to the first generated text (streams).",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("model",),
        )
        self.inter_token_latency = metrics.Histogram(
            "phiserve_inter_token_latency_seconds",
            description="Mean time between generated tokens of one stream.",
            boundaries=TOKEN_LATENCY_BUCKETS_S,
            tag_keys=("model",),
        )
        self.queue_wait = metrics.Histogram(
            "phiserve_queue_wait_seconds",
            description="Time a request waited in its pool's fair queue.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("pool",),
        )
        self.rejected = metrics.Counter(
            "phiserve_requests_rejected_total",
            description="Requests refused by admission or the fair queue, by reason.",
            tag_keys=("reason",),
        )
        self.prompt_tokens = metrics.Counter(
            "phiserve_prompt_tokens_total",
            description="Prompt tokens of finished requests.",
            tag_keys=("model", "tenant"),  # type: ignore[arg-type]  # Ray annotates Tuple[str]
        )
        self.completion_tokens = metrics.Counter(
            "phiserve_completion_tokens_total",
            description="Generated tokens of finished requests (streams included).",
            tag_keys=("model", "tenant"),  # type: ignore[arg-type]  # Ray annotates Tuple[str]
        )
        self.adapter_requests = metrics.Counter(
            "phiserve_adapter_requests_total",
            description="Settled requests that ran with a tenant's LoRA adapter (issue 14). `model` "
            "is the base model; `adapter` the adapter's name for tenants with metrics_label, "
            "else `other` (bounded: labelled tenants' max_adapters each).",
            tag_keys=("model", "tenant", "adapter"),  # type: ignore[arg-type]  # Ray annotates Tuple[str]
        )
        self.context_routed = metrics.Counter(
            "phiserve_context_routed_total",
            description="Requests of a model with a long-context pool, by the pool that ran them "
            "(tier short: the model's own pool; long: its long_context_pool).",
            tag_keys=("model", "tier"),  # type: ignore[arg-type]  # Ray annotates Tuple[str]
        )
        self.pool_in_flight = metrics.Gauge(
            "phiserve_pool_in_flight",
            description="Requests holding a fair-queue slot of the pool (all gateways).",
            tag_keys=("pool",),
        )
        self.pool_waiting = metrics.Gauge(
            "phiserve_pool_waiting",
            description="Requests waiting in the pool's fair queue (all gateways).",
            tag_keys=("pool",),
        )


def tenant_label(tenant_id: str, labelled: bool) -> str:
    return tenant_id if labelled else OTHER_TENANTS


def adapter_label(adapter_name: str, labelled: bool) -> str:
    """An adapter's name only for a tenant with metrics_label, like `tenant_label`."""
    return adapter_name if labelled else OTHER_TENANTS
