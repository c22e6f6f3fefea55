"""The Phi-3.5-vision parts of the tiny model builder (see tiny.py).

vLLM has ``Phi3VForCausalLM`` built in (Llama text model + a CLIP ViT-L/14-336 tower with
the HD transform), but hard-codes the CLIP shape: hidden 1024, patch 14, image 336. We keep
that shape and cut the tower to one layer (``img_processor.layer_idx = 0``). The image
processor is the model repository's remote code on the hub; ours is
tiny_image_processor.py, copied into the model folder and named in
``preprocessor_config.json``'s ``auto_map`` (load with ``trust_remote_code=True``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

PROCESSOR_MODULE = "tiny_image_processor"
NUM_CROPS = 4
CLIP_HIDDEN, CLIP_INTERMEDIATE, CLIP_PATCH, CLIP_IMAGE = 1024, 4096, 14, 336
CLIP_LAYERS_KEPT = 1


def vision_config(text_cfg: dict) -> dict:
    """Phi-3.5-vision-instruct's config.json, shrunk; model_type phi3 so that no remote
    config code is needed (the hub's says phi3_v)."""
    cfg = dict(text_cfg)
    cfg.update(
        architectures=["Phi3VForCausalLM"],
        model_type="phi3",
        embd_layer={
            "embedding_cls": "image",
            "hd_transform_order": "sub_glb",
            "projection_cls": "mlp",
            "use_hd_transform": True,
            "with_learnable_separator": True,
        },
        img_processor={
            "image_dim_out": CLIP_HIDDEN,
            "layer_idx": CLIP_LAYERS_KEPT - 1,
            "model_name": "openai/clip-vit-large-patch14-336",
            "name": "clip_vision_model",
            "num_img_tokens": 144,
            "type_feature": "patch",
        },
    )
    return cfg


def vision_weights(cfg: dict, w) -> None:
    """Add the image embedding tensors, named as in Phi-3.5-vision-instruct's checkpoint."""
    h = cfg["hidden_size"]
    p = "model.vision_embed_tokens"
    w.normal(f"{p}.glb_GN", 1, 1, 4 * CLIP_HIDDEN)
    w.normal(f"{p}.sub_GN", 1, 1, 1, 4 * CLIP_HIDDEN)
    w.linear(f"{p}.img_projection.0", h, 4 * CLIP_HIDDEN, bias=True)
    w.linear(f"{p}.img_projection.2", h, h, bias=True)
    v = f"{p}.img_processor.vision_model"
    num_positions = (CLIP_IMAGE // CLIP_PATCH) ** 2 + 1
    w.normal(f"{v}.embeddings.class_embedding", CLIP_HIDDEN)
    w.normal(f"{v}.embeddings.patch_embedding.weight", CLIP_HIDDEN, 3, CLIP_PATCH, CLIP_PATCH)
    w.normal(f"{v}.embeddings.position_embedding.weight", num_positions, CLIP_HIDDEN)
    w.layer_norm(f"{v}.pre_layrnorm", CLIP_HIDDEN)
    for n in range(CLIP_LAYERS_KEPT):
        lp = f"{v}.encoder.layers.{n}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            w.linear(f"{lp}.self_attn.{proj}", CLIP_HIDDEN, CLIP_HIDDEN, bias=True)
        w.layer_norm(f"{lp}.layer_norm1", CLIP_HIDDEN)
        w.linear(f"{lp}.mlp.fc1", CLIP_INTERMEDIATE, CLIP_HIDDEN, bias=True)
        w.linear(f"{lp}.mlp.fc2", CLIP_HIDDEN, CLIP_INTERMEDIATE, bias=True)
        w.layer_norm(f"{lp}.layer_norm2", CLIP_HIDDEN)


def preprocessor_config() -> dict:
    from .tiny_image_processor import CLIP_MEAN, CLIP_STD

    return {
        "auto_map": {
            "AutoImageProcessor": f"{PROCESSOR_MODULE}.TinyPhi3VImageProcessor",
            "AutoProcessor": f"{PROCESSOR_MODULE}.TinyPhi3VProcessor",
        },
        "do_convert_rgb": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "TinyPhi3VImageProcessor",
        "image_std": CLIP_STD,
        "num_crops": NUM_CROPS,
        "processor_class": "TinyPhi3VProcessor",
    }


def write_processor_files(dst: Path) -> None:
    """The remote-code module and preprocessor_config.json (AutoProcessor/AutoImageProcessor)."""
    src = Path(__file__).with_name(f"{PROCESSOR_MODULE}.py")
    shutil.copyfile(src, dst / f"{PROCESSOR_MODULE}.py")
    text = json.dumps(preprocessor_config(), indent=2, sort_keys=True) + "\n"
    (dst / "preprocessor_config.json").write_text(text, encoding="utf-8")
