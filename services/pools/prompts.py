"""Turn a `GenerationRequest` into the engine's prompt: chat template and images."""

from __future__ import annotations

import io
import warnings
from typing import Any

from services.catalog.models import Modality
from services.errors import InvalidRequest
from services.pools.engine import GenerationRequest

# Decoding a small file into a huge bitmap ("decompression bomb") would take the
# replica's memory; 36 MP is far beyond what the HD transform uses (it resizes).
MAX_IMAGE_PIXELS = 6000 * 6000

# OpenAI's `developer` role is the newer name for `system`. Phi's chat template knows only
# system/user/assistant and silently drops any other role (issue 9, item 9). A tool's result
# comes back to the model as the user's turn (the gateway labels it as a tool result).
TEMPLATE_ROLES = {"developer": "system", "tool": "user"}


class PromptRenderer:
    """Renders prompts with the model's own chat template (from its tokenizer)."""

    def __init__(self, tokenizer: Any, *, modality: Modality) -> None:
        self._tokenizer = tokenizer
        self._modality = modality

    def render(self, request: GenerationRequest, *, add_generation_prompt: bool = True) -> str:
        """A chat request's conversation as the model's prompt text (the gateway's /tokenize
        renders with this too, through its own template: services/inference/chat_template.py)."""
        assert request.messages is not None, "completion prompts go to the engine as they are"
        image_number = 0
        conversation: list[dict[str, str]] = []
        for message in request.messages:
            # Phi-3-vision marks each image's place with <|image_N|>, numbered
            # across the whole conversation (the model card's prompt format).
            placeholders = []
            for _ in range(message.image_count):
                image_number += 1
                placeholders.append(f"<|image_{image_number}|>\n")
            role = TEMPLATE_ROLES.get(message.role, message.role)
            conversation.append({"role": role, "content": "".join(placeholders) + message.text})
        try:
            rendered = self._tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # noqa: BLE001 - a template error is caused by the conversation's shape
            raise InvalidRequest(f"messages cannot be rendered: {exc}", param="messages") from None
        return str(rendered)


def decode_images(blobs: tuple[bytes, ...]) -> list[Any]:
    from PIL import Image

    images = []
    for index, blob in enumerate(blobs):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(blob))
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise InvalidRequest(
                        f"image {index + 1} is {width}x{height} pixels; the limit is "
                        f"{MAX_IMAGE_PIXELS} pixels",
                        param="messages",
                    )
                images.append(image.convert("RGB"))
        except InvalidRequest:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the decoder raises, the image is the client's
            raise InvalidRequest(
                f"image {index + 1} could not be decoded ({type(exc).__name__}); "
                "send a PNG, JPEG, GIF or WebP as a base64 data: URL",
                param="messages",
            ) from None
    return images
