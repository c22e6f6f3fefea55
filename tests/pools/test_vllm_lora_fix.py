"""vLLM 0.32's torch-native LoRA shrink with the fix of services/pools/vllm_lora_fix.py: a token
marked -1 ("no adapter") gets zeros, never the last slot's adapter; others are unchanged.

The end-to-end proof (a base request batched with another tenant's adapter requests keeps the
base answer) is tests/gateway/test_adapters_e2e.py; this pins the kernel-level behaviour.
"""

from __future__ import annotations

import torch

import services.pools.vllm_lora_fix as fix


def _weights() -> torch.Tensor:
    # Two adapter slots, rank 2, input 3: (slots, 1, rank, in) as vLLM stacks lora_A.
    return torch.arange(1, 13, dtype=torch.float32).reshape(2, 1, 2, 3)


def test_a_token_without_an_adapter_gets_nothing_from_the_last_slot() -> None:
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    fix.mask_no_adapter_rows()
    fix.mask_no_adapter_rows()  # idempotent: one wrapper, not two
    assert lora_ops.bgmv_shrink is punica_cpu.bgmv_shrink  # type: ignore[attr-defined]
    assert fix.LoraIndexGuard().phiserve_lora_guard()
    x = torch.ones(3, 3)
    weights = _weights()
    out = torch.full((3, 2), 7.0)
    lora_ops.bgmv_shrink(x, weights, out, torch.tensor([-1, 0, 1]), 1.0)
    assert out[0].tolist() == [0.0, 0.0]  # unfixed: the last slot's (x @ A[1])
    assert out[1].tolist() == (weights[0, 0] @ x[1]).tolist()
    assert out[2].tolist() == (weights[1, 0] @ x[2]).tolist()

    # The prefill path (sgmv: one index per sequence) goes through the same shrink.
    out = torch.full((3, 2), 7.0)
    lengths = torch.tensor([2, 1])
    lora_ops.sgmv_shrink(x, weights, out, torch.tensor([0, 2]), lengths, torch.tensor([1, -1]), 2, 2, 3, 0.5)
    assert out[0].tolist() == out[1].tolist() == (0.5 * weights[1, 0] @ x[0]).tolist()
    assert out[2].tolist() == [0.0, 0.0]


def test_the_extension_names_the_guard_for_vllms_worker() -> None:
    from vllm.utils.import_utils import resolve_obj_by_qualname

    assert resolve_obj_by_qualname(fix.LORA_FIX_EXTENSION) is fix.LoraIndexGuard
