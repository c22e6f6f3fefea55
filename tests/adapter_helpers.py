"""Tenants' LoRA adapters through the session cluster (issue 14): tenants, registrations through
the admin API, greedy chats, and adapter folders a test owns inside the adapter store."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import CACHE_DIR, Cluster
from tests.helpers import new_tenant as create_tenant

CHAT = "/v1/chat/completions"
BASE = "phi-3.5-mini"
PROMPT = "Write a short line about rivers."
MAX_TOKENS = 12
ADAPTER_STORE = CACHE_DIR / "adapters"  # the cluster's settings.adapter_store_dir


def new_tenant(admin: httpx.Client, **fields: object) -> tuple[str, str]:
    return create_tenant(admin, prefix="l", **fields)


def client(cluster: Cluster, key: str) -> httpx.Client:
    return httpx.Client(base_url=cluster.url, timeout=180, headers={"Authorization": f"Bearer {key}"})


def register(admin: httpx.Client, tenant_id: str, name: str, source: str) -> str:
    """Register `source` (relative to the adapter store) as the tenant's adapter `name` on the
    base model; return its model id."""
    resp = admin.post(
        f"/admin/tenants/{tenant_id}/adapters", json={"name": name, "base_model": BASE, "source": source}
    )
    assert resp.status_code == 201, resp.text
    model_id: str = resp.json()["id"]
    assert model_id == f"ft:{BASE}:{tenant_id}:{name}"
    return model_id


def chat_body(model: str, *, prompt: str = PROMPT, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }


def chat_text(http: httpx.Client, model: str, *, prompt: str = PROMPT) -> str:
    """The greedy answer of `model` to `prompt` (asserting a 200 that names `model`)."""
    resp = http.post(CHAT, json=chat_body(model, prompt=prompt))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == model
    assert body["usage"]["completion_tokens"] == MAX_TOKENS
    text: str = body["choices"][0]["message"]["content"]
    return text


@contextmanager
def owned_copy(tiny_name: str) -> Iterator[tuple[str, Path]]:
    """A copy of a tiny adapter (e.g. "phi-3.5-mini-1") that the test owns, inside the adapter
    store: (its source relative to the store, its folder). Removed afterwards."""
    relative = f"test-{uuid.uuid4().hex[:10]}/{tiny_name}"
    folder = ADAPTER_STORE / relative
    shutil.copytree(ADAPTER_STORE / "tiny" / tiny_name, folder)
    try:
        yield relative, folder
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


def usage_by_model(http: httpx.Client) -> dict[str, int]:
    """The caller's own /v1/usage today: requests per model."""
    rows = http.get("/v1/usage").json()["data"]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["model"]] = counts.get(row["model"], 0) + row["requests"]
    return counts
