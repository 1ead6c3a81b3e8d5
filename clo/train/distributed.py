"""Training on N processes with torchrun and FSDP2: the numbers of one process, sharded.

    torchrun --nproc-per-node 4 train.py --lang sw ...          # one machine, 4 GPUs (NCCL)
    torchrun --nproc-per-node 2 train.py --lang sw --device cpu  # CPU processes (gloo)

`python train.py` stays one process without any of this, and so does `torchrun --nproc-per-node 1`:
one process has nothing to shard, and FSDP2 at world size 1 only copies every weight in and out of
its buffers (bench/bench_fsdp_world1.py on a 2-core AMD EPYC: 0.98x-1.01x
the step time, +4.7% CPU time by its --profile; BENCHMARKS.md). Under torchrun with N >= 2:

- Sharding (FSDP2, `shard`): each decoder block is one `fully_shard` unit and the root (embedding,
  final norm, head) another; frozen and trainable weights are both sharded. Every weight is held
  in fp32 (a shard of fp32 is no larger than a whole bf16 copy from 2 processes on), so the
  checkpoint's values stay exact and nothing needs a master copy; on CUDA a mixed-precision policy
  computes in bf16 and reduces gradients in fp32.
- Data: every micro-batch of `--batch-size` examples is the same global micro-batch as in one
  process; process r takes the r-th contiguous share (`share`). A loss that is a mean over the batch
  (the NLL per token, the DPO terms per example) is divided by the whole batch's count, not the
  share's, and FSDP sums the gradients instead of averaging them, so the N-process gradient is the
  1-process gradient. A process whose share is empty (a short last batch) runs one example with
  weight 0, because every process must run the same collectives.
- Metrics are computed from the gathered per-sequence log-probs of the whole batch: the same numbers
  a single process logs.
- Files are written by process 0 only (checkpoint, metrics, model); the others compute.
"""

import torch

from clo.errors import CloError
from clo.world import World


def shard(model, world: World, compute_dtype: torch.dtype | None) -> None:
    """FSDP2 over `model` in place: one unit per decoder block, then the root. Every weight in fp32;
    compute_dtype (bf16 on CUDA) casts the gathered weights for compute, gradients reduce in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    for p in model.parameters():
        if p.dtype != torch.float32:
            p.data = p.data.float()
    device = model.embed_tokens.weight.device
    mesh = init_device_mesh(device.type, (world.size,))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in [*model.layers, model]:
        module.set_gradient_divide_factor(1.0)  # sum the shares' gradients: each loss is already a share of the whole
        module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter (a collective: every process must call it), else `t`."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_weights(model, names) -> dict:
    """{name: whole tensor on the CPU} for the parameters `names` (every process must call it)."""
    return {n: full_tensor(p.detach()).cpu() for n, p in model.named_parameters() if n in names}


def load_weights(model, weights: dict) -> None:
    """Put whole tensors {name: tensor} into the model, sharding them where the model is sharded."""
    if not is_sharded(model):
        params = dict(model.named_parameters())
        for name, value in weights.items():
            params[name].data = value.to(params[name].device)  # keeps the saved dtype: fp32 master weights stay fp32
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))


def optimizer_state(model, optimizer) -> dict:
    """The optimizer's state to save: as is in one process, gathered by parameter name when sharded."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict) -> None:
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def check_batch(batch_size: int, world: World) -> None:
    if world.size > 1 and batch_size < world.size:
        raise CloError(f"--batch-size {batch_size}: smaller than the {world.size} processes; each micro-batch is split across them")
