"""Redis stops during traffic: 503 + Retry-After while down, normal service after, no leaks."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx

from services.redis_store import keys
from tests.conftest import AUTH, Cluster, wait_until

CHAT = "/v1/chat/completions"
BODY = {"model": "phi-3.5-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_redis_restart_during_traffic(cluster: Cluster) -> None:
    import redis

    stop = threading.Event()
    statuses: list[int] = []

    def traffic() -> None:
        with httpx.Client(base_url=cluster.url, headers=AUTH, timeout=60) as c:
            while not stop.is_set():
                resp = c.post(CHAT, json=BODY)
                statuses.append(resp.status_code)
                if resp.status_code == 503:
                    assert resp.headers.get("retry-after"), resp.headers
                    assert resp.json()["error"]["code"] == "tenancy_unavailable"

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(traffic) for _ in range(4)]
        wait_until(lambda: statuses.count(200) >= 8, timeout_s=60, what="traffic flowing")
        cluster.redis.stop()
        wait_until(lambda: statuses[-4:] == [503] * 4, timeout_s=30, what="503s while Redis is down")
        cluster.redis.start()  # same directory: the AOF brings tenants and keys back
        seen = len(statuses)
        wait_until(lambda: statuses[seen:].count(200) >= 8, timeout_s=60, what="service after Redis returns")
        stop.set()
        for w in workers:
            w.result()

    assert set(statuses) <= {200, 503}, set(statuses)
    client = redis.Redis.from_url(cluster.redis.url, decode_responses=True)

    def live(key: str) -> int:
        # A lease whose expiry passed holds no slot (admission drops it on its next step).
        return int(client.zcount(key, int(time.time() * 1000), "+inf"))

    # Every slot taken was given back, or its lease ran out: nothing leaked.
    wait_until(
        lambda: live(keys.concurrency_leases("demo")) == 0 and live(keys.pool_in_flight("text")) == 0,
        timeout_s=cluster.settings.lease_ttl_s + 10,
        what="no leaked slots",
    )
    assert client.zcard(keys.pool_waiting("text")) == 0
