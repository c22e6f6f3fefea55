"""The ingress of a test application that deploys a pool behind a custom request router."""

from __future__ import annotations

from typing import Any


def front_class() -> type:
    """The application's ingress, holding the pool as phiserve's gateway does. Under HAProxy,
    Serve refuses a custom request router on an ingress deployment (HAProxy would bypass it),
    and a pool is never one. Defined in a function so cloudpickle ships it by value."""

    class PoolFront:
        def __init__(self, pool: Any) -> None:
            self._pool = pool

        async def __call__(self) -> str:
            return "front"

    return PoolFront
