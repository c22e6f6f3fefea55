"""GET /v1/models: every served name and alias, with modality and context length."""

from __future__ import annotations

import time

from services.catalog.models import Catalog
from services.inference.protocol.responses import ModelList


class ModelsService:
    def __init__(self, catalog: Catalog) -> None:
        created = int(time.time())
        self._listing: ModelList = {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "phiserve",
                    "root": pool.served_names[0],
                    "pool": pool.name,
                    "modality": pool.modality.value,
                    "max_model_len": pool.engine.max_model_len,
                    "max_images_per_request": pool.max_images_per_request,
                }
                for pool in catalog.enabled_pools
                for name in pool.names
            ],
        }

    def list(self) -> ModelList:
        return self._listing
