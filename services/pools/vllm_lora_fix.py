"""A fix for vLLM 0.32's CPU LoRA kernels: a token with no adapter must get no adapter (issue 14).

vLLM marks a token that runs without an adapter with slot index -1
(`vllm/lora/punica_wrapper/utils.py`, `convert_mapping`). Its GPU kernels skip -1. The
PyTorch-native ops its CPU backend uses (`vllm/lora/ops/torch_ops/lora_ops.py`) index the
stacked adapter weights with it, and -1 is Python's LAST element: a base-model request that
shared an engine step with adapter requests ran with whatever adapter sat in the last slot,
another tenant's fine-tune (measured: tests/gateway/test_adapters_e2e.py,
`test_another_tenants_adapter_never_runs_on_my_base_requests`).

Every LoRA layer computes `y += (x @ A[i]) @ B[i] * scale` as a shrink (`x @ A`, into a
buffer) then an expand (`buffer @ B`, added to `y`). Zeroing the shrink's rows of the -1
tokens makes the expand add exactly nothing for them, whichever slot -1 selected.

Where it must run: the CPU platform always spawns vLLM's engine core (vllm/platforms/cpu.py
sets VLLM_WORKER_MULTIPROC_METHOD=spawn), so a patch made in the replica's process never
reaches the process that runs the model. vLLM imports `worker_extension_cls` in the worker
process before the model loads; `LoraIndexGuard` is that class (`LORA_FIX_EXTENSION`), and
importing this module applies the fix there.
"""

from __future__ import annotations

import torch

_MARK = "_phiserve_no_adapter_masked"


def mask_no_adapter_rows() -> None:
    """Wrap vLLM's torch-native `bgmv_shrink` (used by `sgmv_shrink` and by the CPU punica
    wrapper, which imported it by name) so rows whose index is -1 come out zero. Idempotent."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    original = lora_ops.bgmv_shrink
    if getattr(original, _MARK, False):
        return

    def bgmv_shrink(
        inputs: torch.Tensor,
        lora_b_weights: torch.Tensor,  # vLLM's name; these are the lora_A weights
        output_tensor: torch.Tensor,
        lora_indices_tensor: torch.Tensor,
        scaling: float = 1.0,
    ) -> None:
        original(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling)
        no_adapter = lora_indices_tensor < 0
        if bool(no_adapter.any()):
            # The rank is the weights' second-last dimension ((slots, [1,] rank, in)).
            output_tensor[no_adapter, : lora_b_weights.shape[-2]] = 0

    setattr(bgmv_shrink, _MARK, True)
    lora_ops.bgmv_shrink = bgmv_shrink  # sgmv_shrink (prefill) looks it up here
    punica_cpu.bgmv_shrink = bgmv_shrink  # type: ignore[attr-defined]  # the decode path imported it by name


class LoraIndexGuard:
    """vLLM's worker extension (mixed into its worker class): its import is what matters."""

    def phiserve_lora_guard(self) -> bool:
        """For `collective_rpc`: the fix is in place in the worker's process."""
        from vllm.lora.ops.torch_ops import lora_ops

        return bool(getattr(lora_ops.bgmv_shrink, _MARK, False))


# vLLM's `worker_extension_cls` engine argument that loads the fix into the worker process.
LORA_FIX_EXTENSION = f"{__name__}.{LoraIndexGuard.__qualname__}"

mask_no_adapter_rows()
