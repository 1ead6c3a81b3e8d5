"""Training on N processes with torchrun and FSDP2: the numbers of one process, sharded.

    torchrun --nproc-per-node 4 train.py --lang sw ...          # one machine, 4 GPUs (NCCL)
    torchrun --nproc-per-node 2 train.py --lang sw --device cpu  # CPU processes (gloo)

`python train.py` stays one process without any of this, and so does `torchrun --nproc-per-node 1`:
one process has nothing to shard, and FSDP2 at world size 1 only copies every weight in and out of
its buffers (bench/bench_fsdp_world1.py on a 2-core AMD EPYC: 0.98x-1.01x
the step time, +4.7% CPU time by its --profile; BENCHMARKS.md). Under torchrun with N >= 2:

- Sharding (FSDP2, `shard`): each decoder block is one `fully_shard` unit and the root (embedding,
  final norm, head) another; frozen and trainable weights are both sharded, from the start: the
  model is sharded on the meta device and each process reads only its rows (`load_sharded`). Every weight is held
  in fp32 (a shard of fp32 is no larger than a whole bf16 copy from 2 processes on), so the
  checkpoint's values stay exact and nothing needs a master copy; on CUDA a mixed-precision policy
  computes in bf16 and reduces gradients in fp32.
- Data: every micro-batch of `--batch-size` examples is the same global micro-batch as in one
  process; process r takes the r-th contiguous share (`share`). A loss that is a mean over the batch
  (the NLL per token, the DPO terms per example) is divided by the whole step's count (every
  micro-batch of it, clo/train/step.py), not the share's, and FSDP sums the gradients instead of averaging them, so the N-process gradient is the
  1-process gradient. A process whose share is empty (a short last batch) runs one example with
  weight 0, because every process must run the same collectives.
- Metrics are computed from the gathered per-sequence log-probs of the whole batch: the same numbers
  a single process logs.
- Checkpoints are sharded: each process saves and loads only its own part of the trained weights
  and of the optimizer state (`local_weights`, `optimizer_state`; clo/train/run.py writes one file
  per process and a small checkpoint.pt that names them). Nothing is gathered, so a 13B run's ~67 GB
  of trained state is written by N processes at once and no process ever holds all of it.
- The final model is gathered one tensor at a time into a whole copy on process 0 (`gather_into`),
  which alone writes it, with metrics.jsonl; every process must see the same --out (one machine,
  or a shared file system).
"""

import torch

from clo.errors import CloError
from clo.world import World


def shard(model, world: World, compute_dtype: torch.dtype | None, device: torch.device | None = None) -> None:
    """FSDP2 over `model` in place: one unit per decoder block, then the root. Every weight in fp32;
    compute_dtype (bf16 on CUDA) casts the gathered weights for compute, gradients reduce in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    for p in model.parameters():
        if p.dtype != torch.float32:
            p.data = p.data.float()
    device = device or model.embed_tokens.weight.device  # the model may still be on the meta device
    mesh = init_device_mesh(device.type, (world.size,))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in [*model.layers, model]:
        module.set_gradient_divide_factor(1.0)  # sum the shares' gradients: each loss is already a share of the whole
        module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)


def load_sharded(folder, world: World, device: torch.device, compute_dtype: torch.dtype | None, adapters=None):
    """The starting model of N processes, sharded as it loads, so that no process ever holds all of it
    (13B in fp32: 52 GB), only its shards and one whole tensor at a time: the model is built on the
    meta device (with LoRA adapters where `adapters(model)` adds them), sharded (`shard`), given
    storage for its shards only, and each process then reads the checkpoint one tensor at a time and
    keeps its own rows. The values are those of `load_model` + `add_lora` in one process, in fp32:
    each adapter is initialised whole, in the same order and from the same RNG, and then cut."""
    from torch.distributed.tensor import distribute_tensor

    from clo.model.decoder import rope_inv_freq
    from clo.model.hf_folder import empty_model, read_weights
    from clo.model.lora import init_adapters, lora_layers

    model = empty_model(folder)
    tensors = read_weights(folder, model)  # the base model's weights: before adapters are added
    if adapters is not None:
        adapters(model)
    shard(model, world, compute_dtype, device)  # on the meta device: the layout only
    model.to_empty(device=device)
    params = dict(model.named_parameters())

    def keep_rows(p, whole: torch.Tensor) -> None:  # src_data_rank=None: each process cuts its own rows, no communication
        p.to_local().copy_(distribute_tensor(whole.to(device, torch.float32), p.device_mesh, p.placements, src_data_rank=None).to_local())

    with torch.no_grad():
        for name, tensor in tensors:
            keep_rows(params[name], tensor)
        for layer in lora_layers(model).values():
            a, b = (torch.empty(w.shape, device=device) for w in (layer.lora_A.weight, layer.lora_B.weight))
            init_adapters(a, b)
            keep_rows(layer.lora_A.weight, a)
            keep_rows(layer.lora_B.weight, b)
    model.inv_freq = rope_inv_freq(model.cfg).to(device)
    return model.eval()


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter (a collective: every process must call it), else `t`."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This process's part of `t` on the CPU: its shard if `t` is sharded (a DTensor), else all of it."""
    from torch.distributed.tensor import DTensor

    return (t.to_local() if isinstance(t, DTensor) else t).detach().cpu()


def local_weights(model, names) -> dict:
    """{name: this process's part on the CPU} of the parameters `names` (no communication)."""
    return {n: local_part(p) for n, p in model.named_parameters() if n in names}


def load_weights(model, weights: dict) -> None:
    """Put the saved parts {name: tensor} (from `local_weights`) back: whole tensors into an unsharded
    model, each process's shard into its own part of a sharded one."""
    from torch.distributed.tensor import DTensor

    params = dict(model.named_parameters())
    for name, value in weights.items():
        p = params[name]
        if isinstance(p, DTensor):
            with torch.no_grad():
                p.to_local().copy_(value)  # the shard in place: FSDP2 gathers from this storage
        else:
            p.data = value.to(p.device)  # keeps the saved dtype: fp32 master weights stay fp32


def gather_into(model, whole) -> None:
    """Copy a sharded model's weights into `whole`, an unsharded copy on process 0 (None on the others),
    one parameter at a time, so no process holds more than the whole model plus one gathered tensor
    (every process must call it)."""
    into = dict(whole.named_parameters()) if whole is not None else None
    for name, p in model.named_parameters():
        t = full_tensor(p.detach())
        if into is not None:
            into[name].data = t.cpu()


def optimizer_state(model, optimizer) -> dict:
    """The optimizer's state to save: this process's part of it (each moment of a sharded parameter is a
    shard of the same layout, kept as a plain tensor; weights_only-loadable)."""
    state = optimizer.state_dict()
    if is_sharded(model):
        state["state"] = {i: {k: local_part(v) if torch.is_tensor(v) else v for k, v in s.items()} for i, s in state["state"].items()}
    return state


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """The inverse of `optimizer_state`: each saved shard becomes a DTensor laid out like its parameter."""
    if is_sharded(model):
        from torch.distributed.tensor import DTensor

        params = [p for group in optimizer.param_groups for p in group["params"]]  # the order state_dict numbers them in

        def like(p, v):
            if not isinstance(p, DTensor) or not torch.is_tensor(v) or v.dim() == 0:  # AdamW's "step" is a plain scalar
                return v
            return DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())

        state = {**state, "state": {i: {k: like(params[i], v) for k, v in s.items()} for i, s in state["state"].items()}}
    try:
        optimizer.load_state_dict(state)
    except ValueError as e:  # another layout of parameter groups (weight decay's groups came with a later version)
        raise CloError(f"checkpoint: its optimizer state does not fit this run's parameters ({e}); resume it with the version of train.py that made it") from None


def check_batch(batch_size: int, world: World) -> None:
    if world.size > 1 and batch_size < world.size:
        raise CloError(f"--batch-size {batch_size}: smaller than the {world.size} processes; each micro-batch is split across them")
