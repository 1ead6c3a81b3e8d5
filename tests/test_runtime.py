"""clo/runtime.py: which CPUs `--amp auto` computes in bf16 on, decided by the CPU's instructions."""

import pytest
import torch

from clo.runtime import bf16_is_fast
from clo.train.precision import training_precision


@pytest.mark.parametrize(("amx", "avx512_bf16", "fast"), [(True, False, True), (False, True, True), (False, False, False)])
def test_bf16_is_fast_on_cpus_with_bf16_matmul_instructions(monkeypatch, amx, avx512_bf16, fast):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert bf16_is_fast("cpu") is fast
    policy = training_precision(torch.device("cpu"))  # --amp auto, --dtype auto
    assert policy.autocast == (torch.bfloat16 if fast else None) and policy.frozen == torch.float32
    assert bf16_is_fast("cuda")  # whatever the host CPU


def test_a_torch_without_the_checks_computes_in_fp32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert not bf16_is_fast("cpu")
