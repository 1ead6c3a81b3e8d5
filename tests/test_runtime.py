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


def test_the_cuda_policy_of_n_processes_is_its_own_precision():
    """On CUDA under torchrun FSDP2 computes from bf16 copies of every weight, which one process with fp32 weights
    under autocast does not: another precision, so another reference cache key and checkpoint setting."""
    cuda = torch.device("cuda")
    one, sharded = training_precision(cuda, "float32"), training_precision(cuda, sharded=True)
    assert (one.frozen, one.autocast) == (sharded.frozen, sharded.autocast) == (torch.float32, torch.bfloat16)
    assert sharded.gathered == torch.bfloat16 and one.gathered is None and str(one) != str(sharded)
    cpu = torch.device("cpu")  # no policy there: 2 CPU processes compute as one (tests/test_distributed.py)
    assert training_precision(cpu, sharded=True).gathered is None and str(training_precision(cpu, sharded=True)) == str(training_precision(cpu))
    assert training_precision(cuda, amp="off", sharded=True).gathered is None
