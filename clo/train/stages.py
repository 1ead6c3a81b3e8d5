"""What trains: parameter groups, stages of them, and the start of each stage.

The paper trains only the attention layers (q, k, v, o projections; docs/paper.md "Parameters that
train"); it also reports that attention-only did much worse than full training on Llama-2 Swahili,
so the groups are configurable and can change by stage: `--stages attn:1,all:1` trains attention for
one epoch, then everything for one more.

    group  parameters
    attn   layers.*.self_attn.{q,k,v,o}_proj (weights and biases)
    mlp    layers.*.mlp.{gate,up,down}_proj
    embed  embed_tokens (with tied embeddings this is also the head)
    norm   every RMSNorm weight
    head   lm_head (untied models only)
    all    everything

With LoRA, the base stays frozen and a stage trains the lora_* parameters inside its groups.
"""

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from clo.errors import CloError
from clo.model.decoder import ATTENTION_PROJECTIONS, MLP_PROJECTIONS
from clo.runtime import compile_blocks
from clo.train.precision import master_copies, restore_originals

GROUPS = ("attn", "mlp", "embed", "norm", "head", "all")


def group_of(name: str) -> str:
    """The group of a parameter name such as `layers.3.self_attn.q_proj.weight`."""
    if ".self_attn." in name:
        return "attn"
    if ".mlp." in name:
        return "mlp"
    if name.startswith("embed_tokens."):
        return "embed"
    if name.startswith("lm_head."):
        return "head"
    if name.endswith("norm.weight"):
        return "norm"
    raise ValueError(f"parameter {name!r} belongs to no group")


LINEAR_MODULES = {"attn": ATTENTION_PROJECTIONS, "mlp": MLP_PROJECTIONS, "all": ATTENTION_PROJECTIONS + MLP_PROJECTIONS}


def lora_targets(groups) -> tuple[str, ...]:
    """The linear modules LoRA wraps for these groups (attention when the groups hold no linear layer)."""
    names = [m for g in groups for m in LINEAR_MODULES.get(g, ())]
    return tuple(dict.fromkeys(names)) or ATTENTION_PROJECTIONS


@dataclass(frozen=True)
class Stage:
    groups: tuple[str, ...]
    epochs: int


def parse_stages(spec: str) -> list[Stage]:
    """'attn:1,all:1' -> [Stage(('attn',), 1), Stage(('all',), 1)]; groups may be joined by '+' (attn+mlp:2)."""
    stages = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*([a-z+]+)\s*:\s*(\d+)\s*", part)
        if not m or int(m.group(2)) < 1:
            raise CloError(f"--stages: {part.strip()!r} is not GROUP:EPOCHS (e.g. attn:1,all:1)")
        groups = tuple(m.group(1).split("+"))
        unknown = [g for g in groups if g not in GROUPS]
        if unknown:
            raise CloError(f"--stages: unknown group {unknown[0]!r}; groups: {', '.join(GROUPS)}")
        stages.append(Stage(groups, int(m.group(2))))
    return stages


def set_trainable(model: nn.Module, groups: tuple[str, ...], lora: bool = False) -> dict[str, int]:
    """Make exactly `groups` trainable (their lora_* parameters when `lora`); returns trainable counts per group."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        is_lora = ".lora_" in name
        group = group_of(name.replace(".lora_A", "").replace(".lora_B", ""))
        wanted = ("all" in groups or group in groups) and (is_lora == lora)
        p.requires_grad_(wanted)
        if wanted:
            counts[group] = counts.get(group, 0) + p.numel()
    if not counts:
        raise CloError(f"--stages: groups {'+'.join(groups)} select no parameters" + (" with LoRA" if lora else ""))
    return counts


def decay_groups(params: list, weight_decay: float) -> list:
    """AdamW's parameter groups: weight decay on matrices only, never on RMSNorm gains or biases (1-D), which
    decay would pull towards 0 rather than towards their own scale (as transformers' Trainer and TRL do).
    One group when nothing decays, so that a run without weight decay keeps the optimizer state's layout."""
    vectors = [p for p in params if p.dim() < 2]
    if weight_decay == 0 or not vectors:
        return params
    return [{"params": [p for p in params if p.dim() >= 2]}, {"params": vectors, "weight_decay": 0.0}]


def begin_stage(model: nn.Module, groups: tuple[str, ...], *, lora: bool, lr: float, weight_decay: float,
                compile: bool = False, checkpoint_activations: bool = False, source=None, trained=frozenset()):
    """Make `groups` trainable with fp32 master copies and a fresh AdamW over them. -> (optimizer, params, counts).

    source: the starting checkpoint's folder; a weight that starts training here (not in `trained`,
    the names an earlier stage or the resumed checkpoint already trained) starts from its value
    there, exactly (clo/train/precision.py, rules 2 and 3).
    """
    counts = set_trainable(model, groups, lora=lora)
    if source is not None:
        restore_originals(model, source, [n for n, p in model.named_parameters() if p.requires_grad and n not in trained])
    trainable = [p for p in model.parameters() if p.requires_grad]
    master_copies(trainable)
    fused = trainable[0].device.type == "cuda"
    optimizer = torch.optim.AdamW(decay_groups(trainable, weight_decay), lr=lr, weight_decay=weight_decay, fused=fused)
    if compile:
        compile_blocks(model)
    model.checkpoint_activations = checkpoint_activations
    model.train()
    return optimizer, trainable, counts
