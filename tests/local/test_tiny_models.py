"""The offline tiny-model builder (services/local/tiny_models.py): real builds, no mocks, no engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from services.local.tiny_models import MARKER, TINY_MODEL_NAMES, TOKENIZER_DIR, build_tiny_models

ARCHITECTURES = {
    "phi-3.5-mini-tiny": ("Phi3ForCausalLM", "phi3"),
    "phi-3.5-moe-tiny": ("PhiMoEForCausalLM", "phimoe"),
    "phi-3.5-vision-tiny": ("Phi3VForCausalLM", "phi3"),
}


# Builds the models with torch and transformers: not part of the fast layer.
pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("tiny-models")
    logs: list[str] = []
    paths = build_tiny_models(cache_dir, log=logs.append)
    return cache_dir, paths, logs


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def _config(folder: Path, name: str = "config.json") -> dict:
    return json.loads((folder / name).read_text())


def test_builds_every_model_folder(built):
    cache_dir, paths, logs = built
    assert tuple(paths) == TINY_MODEL_NAMES
    for name, folder in paths.items():
        assert folder == cache_dir.resolve() / name
        assert (folder / MARKER).is_file()
        assert (folder / "model.safetensors").stat().st_size < 100 * 1024 * 1024
        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            assert (folder / f).is_file(), f
    assert (cache_dir / TOKENIZER_DIR / MARKER).is_file()
    assert len(logs) == 1 + len(TINY_MODEL_NAMES)  # tokenizer + one line per model


@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
def test_config_is_the_hub_layout(built, name):
    folder = built[1][name]
    cfg = _config(folder)
    architecture, model_type = ARCHITECTURES[name]
    assert cfg["architectures"] == [architecture]
    assert cfg["model_type"] == model_type
    assert cfg["vocab_size"] == 32064
    assert "rope_parameters" not in cfg
    rope = cfg["rope_scaling"]
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    assert rope["type"] == "longrope"
    assert len(rope["short_factor"]) == len(rope["long_factor"]) == head_dim // 2
    assert cfg["max_position_embeddings"] > cfg["original_max_position_embeddings"]
    assert _config(folder, "generation_config.json")["eos_token_id"] == [32000, 32007]


def test_moe_and_vision_specifics(built):
    paths = built[1]
    moe = _config(paths["phi-3.5-moe-tiny"])
    assert moe["num_local_experts"] == 4 and moe["num_experts_per_tok"] == 2
    assert moe["attention_bias"] and moe["lm_head_bias"]
    assert {"short_mscale", "long_mscale"} <= set(moe["rope_scaling"])

    vision_dir = paths["phi-3.5-vision-tiny"]
    vision = _config(vision_dir)
    assert vision["img_processor"]["image_dim_out"] == 1024
    assert vision["img_processor"]["layer_idx"] == 0
    assert vision["embd_layer"]["hd_transform_order"] == "sub_glb"
    pre = _config(vision_dir, "preprocessor_config.json")
    assert pre["num_crops"] == 4
    for cls in pre["auto_map"].values():
        module = cls.split(".")[0]
        assert (vision_dir / f"{module}.py").is_file()


def test_weights_are_named_like_the_real_checkpoints(built):
    from safetensors import safe_open

    paths = built[1]
    expected = {
        "phi-3.5-mini-tiny": [
            "model.layers.1.self_attn.qkv_proj.weight",
            "model.layers.1.mlp.gate_up_proj.weight",
            "lm_head.weight",
        ],
        "phi-3.5-moe-tiny": [
            "model.layers.1.block_sparse_moe.gate.weight",
            "model.layers.1.block_sparse_moe.experts.3.w2.weight",
            "model.layers.0.self_attn.q_proj.bias",
            "lm_head.bias",
        ],
        "phi-3.5-vision-tiny": [
            "model.vision_embed_tokens.glb_GN",
            "model.vision_embed_tokens.sub_GN",
            "model.vision_embed_tokens.img_projection.2.weight",
            "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.0.mlp.fc1.weight",
        ],
    }
    for name, keys in expected.items():
        with safe_open(str(paths[name] / "model.safetensors"), "pt") as f:
            names = set(f.keys())
            assert set(keys) <= names, name
            assert list(f.get_slice("model.embed_tokens.weight").get_shape()) == [32064, 128]
    with safe_open(str(paths["phi-3.5-vision-tiny"] / "model.safetensors"), "pt") as f:
        patch = "model.vision_embed_tokens.img_processor.vision_model.embeddings.patch_embedding.weight"
        assert list(f.get_slice(patch).get_shape()) == [1024, 3, 14, 14]
        tensor_names = f.keys()  # a safetensors handle is not iterable
        assert not any(".layers.1." in k for k in tensor_names if "img_processor" in k)


@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
def test_tokenizer_special_tokens(built, name):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(built[1][name]))
    assert len(tok) == 32064
    ids = {
        "<|endoftext|>": 32000,
        "<|assistant|>": 32001,
        "<|system|>": 32006,
        "<|end|>": 32007,
        "<|user|>": 32010,
        "<|image|>": 32044,
        "<s>": 1,
    }
    for token, token_id in ids.items():
        assert tok.convert_tokens_to_ids(token) == token_id, token
    assert tok.eos_token_id == 32000 and tok.pad_token_id == 32000 and tok.bos_token_id == 1
    text = "def f(x):\n    return x + 1  # ünïcode"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert tok("<|user|>\nhi<|end|>", add_special_tokens=False).input_ids[0] == 32010


def test_chat_template_renders_list_content(built):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(built[1]["phi-3.5-vision-tiny"]))
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "<|image_1|>\nWhat is this?"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}, {"type": "text", "text": "Really?"}]},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|system|>\nBe brief.<|end|>\n"
        "<|user|>\n<|image_1|>\nWhat is this?<|end|>\n"
        "<|assistant|>\nA cat.<|end|>\n"
        "<|user|>\nSure?\nReally?<|end|>\n"
        "<|assistant|>\n"
    )
    plain = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert plain == "<|user|>\nhi<|end|>\n<|endoftext|>"


def test_vision_processor_loads_as_remote_code(built):
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(built[1]["phi-3.5-vision-tiny"]), trust_remote_code=True)
    assert proc.img_tokens[0] == "<|image_1|>"
    assert proc.calc_num_image_tokens_from_image_size(width=640, height=480) == 757
    out = proc(text="<|image_1|>", images=[Image.new("RGB", (640, 480))], return_tensors="pt")
    assert tuple(out["pixel_values"].shape) == (1, 5, 3, 336, 336)
    assert out["image_sizes"].tolist() == [[672, 672]]
    tall = proc.image_processor(Image.new("RGB", (200, 900)))
    h, w = tall["image_sizes"].tolist()[0]
    assert h % 336 == 0 and w % 336 == 0 and (h // 336) * (w // 336) <= 4
    assert tall["num_img_tokens"][0] == proc.calc_num_image_tokens_from_image_size(200, 900)


def test_second_call_is_a_no_op(built):
    cache_dir, paths, _ = built
    before = _mtimes(cache_dir)
    logs: list[str] = []
    again = build_tiny_models(cache_dir, log=logs.append)
    assert again == paths
    assert logs == []
    assert _mtimes(cache_dir) == before


def test_interrupted_build_is_redone(built, tmp_path):
    cache_dir, paths, _ = built
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    broken = copy / "phi-3.5-moe-tiny"
    (broken / MARKER).unlink()  # as if the build died before writing the marker
    (broken / "model.safetensors").write_bytes(b"truncated")
    stale = copy / ".phi-3.5-mini-tiny.x1y2.tmp"  # a temp folder left by a killed build
    stale.mkdir()
    untouched = {n: _mtimes(copy / n) for n in ("phi-3.5-mini-tiny", "phi-3.5-vision-tiny")}

    logs: list[str] = []
    rebuilt = build_tiny_models(copy, log=logs.append)

    assert rebuilt["phi-3.5-moe-tiny"] == broken.resolve()
    assert (broken / MARKER).is_file()
    original = paths["phi-3.5-moe-tiny"] / "model.safetensors"
    assert (broken / "model.safetensors").read_bytes() == original.read_bytes()  # deterministic
    assert len(logs) == 1 and "phi-3.5-moe-tiny" in logs[0]
    assert not stale.exists()
    for name, mtimes in untouched.items():
        assert _mtimes(copy / name) == mtimes
    assert not [p for p in copy.iterdir() if p.name.endswith((".tmp", ".old"))]
