"""gRPC fixtures: a real client over loopback to the session cluster's gateway replicas."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.grpc.client import Client
from services.grpc.servicer import SERVICE_NAME
from tests.conftest import DEMO_KEY, Cluster, wait_until
from tests.helpers import new_tenant as create_tenant


def grpc_target(cluster: Cluster) -> str:
    return f"127.0.0.1:{cluster.settings.grpc_port}"


@pytest.fixture(scope="session")
def grpc_channel(cluster: Cluster) -> Iterator[grpc.Channel]:
    channel = grpc.insecure_channel(grpc_target(cluster))
    health = health_pb2_grpc.HealthStub(channel)

    def serving() -> bool:
        answer = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    wait_until(serving, timeout_s=60, what="gRPC InferenceService SERVING")
    yield channel
    channel.close()


@pytest.fixture(scope="session")
def grpc_client(grpc_channel: grpc.Channel) -> Client:
    return Client(api_key=DEMO_KEY, channel=grpc_channel, timeout_s=120)


def new_tenant(admin: httpx.Client, **fields: object) -> tuple[str, str]:
    return create_tenant(admin, prefix="g", **fields)


def usage_of(admin: httpx.Client, tenant_id: str) -> dict[str, int]:
    rows = admin.get(f"/admin/usage?tenant_id={tenant_id}").json()["data"]
    return {
        field: sum(row[field] for row in rows) for field in ("requests", "prompt_tokens", "completion_tokens")
    }
