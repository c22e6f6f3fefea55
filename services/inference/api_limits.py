"""Requests to the files, batches and usage routes count against the tenant's RPM.

Without this, a tenant limited to N generations a minute could still send unlimited
uploads, batch creations and usage scans, each costing Redis and disk (issue 9, item 4).
The same atomic admission step as a generation counts the request in the tenant's exact
sliding window; only the RPM limit applies (no tokens are reserved, and the concurrency
slot the step takes is given back at once).
"""

from __future__ import annotations

from services.errors import RateLimited
from services.inference.metrics import GatewayMetrics
from services.tenancy.admission import Admission
from services.tenancy.models import Tenant, TenantLimits


class ApiRequestLimiter:
    def __init__(self, admission: Admission, metrics: GatewayMetrics) -> None:
        self._admission = admission
        self._metrics = metrics

    async def count(self, tenant: Tenant) -> None:
        """Count one request; raise `RateLimited` (429, Retry-After) over the tenant's RPM."""
        rpm = tenant.limits.rpm
        if not rpm:
            return
        rpm_only = tenant.model_copy(update={"limits": TenantLimits(rpm=rpm)})
        try:
            reservation = await self._admission.admit(rpm_only, 0)
        except RateLimited as exc:
            self._metrics.rejected.inc(tags={"reason": exc.param or "rate_limit"})
            raise
        await self._admission.settle(reservation, 0)
