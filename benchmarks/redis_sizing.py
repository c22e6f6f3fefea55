"""Redis memory per tenant and per queued batch item (issue 15: sizing, docs/deploy.md).

Setup: a private redis-server (the project's LocalRedis, no persistence) and phiserve's own
code writing what production writes: `--tenants` tenants, each with an API key, one
admitted-and-settled request (rate windows, the daily budget, a usage row) and one registered
LoRA adapter record; then `--items` batch items of one chat request each, queued on a pool's
stream the way the Batch API queues them (`add_items`, in chunks of 500). Memory is Redis's
`used_memory` after each step against the empty server's, measured in the same run; the
queued item is also given as a ratio against its own JSON body (the bytes a client sent).

    .venv/bin/python benchmarks/redis_sizing.py [--tenants 2000] [--items 20000]

Ends with RESULT redis_sizing bytes_per_tenant=X bytes_per_queued_item=Y item_to_body_ratio=Z
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

from _common import REPO, free_port

sys.path.insert(0, str(REPO))

CHUNK = 500


async def used_memory(store: object) -> int:
    info = await store.redis.info("memory")  # type: ignore[attr-defined]
    return int(info["used_memory"])


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tenants", type=int, default=2000)
    p.add_argument("--items", type=int, default=20000)
    args = p.parse_args()

    from services.batch.queue import add_items
    from services.local.redis_server import LocalRedis
    from services.redis_store import RedisStore
    from services.tenancy.adapters import AdapterRegistry, new_record
    from services.tenancy.admission import Admission, Usage
    from services.tenancy.models import Tenant, TenantLimits
    from services.tenancy.store import TenantStore

    server = LocalRedis(port=free_port(), directory=Path(tempfile.mkdtemp(prefix="redis-sizing-")))
    server.start(appendonly=False)
    store = RedisStore(server.url)
    try:
        empty = await used_memory(store)
        tenants = TenantStore(store)
        admission = Admission(store, lease_ttl_s=60)
        registry = AdapterRegistry(store)
        limits = TenantLimits(rpm=600, tpm=100_000, max_concurrent=16, daily_token_budget=10_000_000)
        for i in range(args.tenants):
            tenant = await tenants.put_tenant(Tenant(id=f"team-{i:05d}", name=f"Team {i}", limits=limits))
            await tenants.create_key(tenant.id, name="service")
            reservation = await admission.admit(tenant, 600)
            usage = Usage(model="phi-3.5-mini", prompt_tokens=420, completion_tokens=130, images=0)
            await admission.settle(reservation, 550, usage=usage)
            record = new_record(
                tenant.id,
                "support-bot",
                base_model="phi-3.5-mini",
                path=f"/var/lib/phiserve/adapters/{tenant.id}/support-bot",
                rank=16,
                target_modules=["down_proj", "gate_up_proj", "o_proj", "qkv_proj"],
            )
            await registry.register(record, max_adapters=8)
        with_tenants = await used_memory(store)
        per_tenant = (with_tenants - empty) / args.tenants

        body = {
            "model": "phi-3.5-mini",
            "messages": [
                {"role": "system", "content": "You summarize support tickets in two sentences."},
                {"role": "user", "content": "Ticket 4711: the export button does nothing on Safari 18. " * 3},
            ],
            "max_tokens": 128,
        }
        body_bytes = len(json.dumps(body).encode())
        for start in range(0, args.items, CHUNK):
            items = [
                {"line": n, "custom_id": f"req-{n}", "url": "/v1/chat/completions", "body": body}
                for n in range(start, min(start + CHUNK, args.items))
            ]
            await add_items(store, "text", f"batch_{start // CHUNK:06d}", items)
        per_item = (await used_memory(store) - with_tenants) / args.items
    finally:
        await store.close()
        server.stop()

    print(f"empty redis: {empty / 1024:.0f} KiB")
    print(
        f"{args.tenants} tenants (key, one settled request, usage row, one adapter): {per_tenant:.0f} B each"
    )
    print(f"{args.items} queued batch items ({body_bytes} B JSON body each): {per_item:.0f} B each")
    print(
        f"RESULT redis_sizing bytes_per_tenant={per_tenant:.0f} bytes_per_queued_item={per_item:.0f} "
        f"item_to_body_ratio={per_item / body_bytes:.2f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
