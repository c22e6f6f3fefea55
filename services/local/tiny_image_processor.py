"""Image processor + processor for the tiny Phi-3.5-vision model (remote code).

This file is copied verbatim into the tiny vision model's folder and named in its
``preprocessor_config.json`` ``auto_map``; vLLM loads it with ``trust_remote_code=True``.
It re-implements what vLLM's ``phi3v`` path needs from the hub's remote code
(``image_processing_phi3_v.py`` / ``processing_phi3_v.py``) without torchvision:
the HD transform into up to ``num_crops`` 336x336 tiles plus one global tile,
``pixel_values`` (n, num_crops + 1, 3, 336, 336), ``image_sizes``, ``num_img_tokens``,
``calc_num_image_tokens_from_image_size`` and ``img_tokens``.
It must stay self-contained (only numpy, torch, PIL and transformers imports).
"""

import math

import numpy as np
import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin

TILE = 336
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def hd_size(width: int, height: int, hd_num: int) -> tuple[int, int]:
    """(width, height) after the HD resize and the padding of the short side to 336s."""
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * TILE)
    new_h = int(new_w / ratio)
    padded_h = int(math.ceil(new_h / TILE) * TILE)
    if transposed:
        return padded_h, new_w
    return new_w, padded_h


def hd_transform(img: Image.Image, hd_num: int) -> Image.Image:
    """Resize keeping the aspect ratio to at most hd_num tiles; pad (white) to 336s."""
    width, height = img.size
    transposed = width < height
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
        width, height = img.size
    target_w, target_h = hd_size(width, height, hd_num)
    new_h = int(target_w / (width / height))
    img = img.resize((target_w, new_h), Image.Resampling.BILINEAR)
    top = (target_h - new_h) // 2
    canvas = Image.new("RGB", (target_w, target_h), (255, 255, 255))
    canvas.paste(img, (0, top))
    if transposed:
        canvas = canvas.transpose(Image.Transpose.TRANSPOSE)
    return canvas


def num_tokens_for(h: int, w: int) -> int:
    return int(((h // TILE) * (w // TILE) + 1) * 144 + 1 + (h // TILE + 1) * 12)


class TinyPhi3VImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values", "image_sizes"]  # noqa: RUF012 - a list, as transformers' base declares it

    def __init__(self, num_crops=4, image_mean=None, image_std=None, do_convert_rgb=True, **kwargs):
        super().__init__(**kwargs)
        self.num_crops = int(num_crops)
        self.image_mean = list(image_mean or CLIP_MEAN)
        self.image_std = list(image_std or CLIP_STD)
        self.do_convert_rgb = do_convert_rgb

    def calc_num_image_tokens_from_image_size(self, width, height):
        w, h = hd_size(int(width), int(height), self.num_crops)
        return num_tokens_for(h, w)

    def calc_num_image_tokens(self, images):
        images = images if isinstance(images, (list, tuple)) else [images]
        return [self.calc_num_image_tokens_from_image_size(*im.size) for im in images]

    def _to_tensor(self, img: Image.Image) -> torch.Tensor:
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        return (arr - mean) / std

    def preprocess(self, images, return_tensors=None, **kwargs):
        if not isinstance(images, (list, tuple)):
            images = [images]
        images = [im.convert("RGB") if self.do_convert_rgb else im for im in images]
        pixel_values, image_sizes, num_img_tokens = [], [], []
        for img in images:
            hd = hd_transform(img, self.num_crops)
            w, h = hd.size
            full = self._to_tensor(hd)  # (3, h, w)
            glb = torch.nn.functional.interpolate(
                full.unsqueeze(0), size=(TILE, TILE), mode="bicubic", align_corners=False
            )
            tiles = (
                full.reshape(3, h // TILE, TILE, w // TILE, TILE)
                .permute(1, 3, 0, 2, 4)
                .reshape(-1, 3, TILE, TILE)
            )
            crops = torch.cat([glb, tiles], dim=0)
            pad = self.num_crops + 1 - crops.shape[0]
            if pad > 0:
                crops = torch.cat([crops, crops.new_zeros(pad, 3, TILE, TILE)], dim=0)
            pixel_values.append(crops)
            image_sizes.append([h, w])
            num_img_tokens.append(num_tokens_for(h, w))
        data = {
            "pixel_values": torch.stack(pixel_values),
            "image_sizes": torch.tensor(image_sizes, dtype=torch.long),
            "num_img_tokens": num_img_tokens,
        }
        return BatchFeature(data=data, tensor_type=return_tensors)


class TinyPhi3VProcessor(ProcessorMixin):
    """Image processor + tokenizer; ``<|image_N|>`` tags in the text stay plain text
    (vLLM swaps them for ``<|image|>`` (32044) x num_img_tokens itself)."""

    special_image_token = "<|image|>"

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)
        self.img_tokens = [f"<|image_{i + 1}|>" for i in range(1000)]

    @property
    def num_crops(self):
        return self.image_processor.num_crops

    @property
    def special_image_token_id(self):
        return self.tokenizer.convert_tokens_to_ids(self.special_image_token)

    def calc_num_image_tokens(self, images):
        return self.image_processor.calc_num_image_tokens(images)

    def calc_num_image_tokens_from_image_size(self, width, height):
        return self.image_processor.calc_num_image_tokens_from_image_size(width, height)

    def __call__(self, text=None, images=None, return_tensors="pt", **kwargs):
        data = {}
        if images is not None:
            data.update(self.image_processor(images, return_tensors=return_tensors))
            data.pop("num_img_tokens", None)
        if text is not None:
            enc = self.tokenizer(text, return_tensors=return_tensors, add_special_tokens=False)
            data.update({k: enc[k] for k in ("input_ids", "attention_mask") if k in enc})
        return BatchFeature(data=data, tensor_type=return_tensors)
