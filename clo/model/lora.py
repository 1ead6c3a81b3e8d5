"""LoRA (Hu et al. 2021, arXiv 2106.09685): train a low-rank update next to each frozen linear layer.

                 h [out]
                    ^
                    +-------------------------.
                    |                          |  x (alpha / r)
          +-------------------+        +---------------+
          |  W [out, in]      |        |  B [out, r]   |  starts at 0, so h = W x at step 0
          |  frozen, bias too |        +---------------+
          +-------------------+        |  A [r, in]    |  kaiming-uniform, as PEFT does
                    ^                  +---------------+
                    |                          ^
                    |                       dropout       (LoRA input only)
                    +-------------------------'
                 x [in]

    h = W x + b + (alpha / r) · B A dropout(x)

Only A and B (named `lora_*`, so freezing and saving select by name) are trained: r·(in + out)
numbers per layer instead of in·out. `merge()` folds (alpha/r)·B A into W, giving a plain model.
Adapters are saved in PEFT's format, so `peft` loads ours and we load theirs. In CLO the frozen
start model is the reference policy (the paper's π_ref): `disable_adapters` gives it without a
second copy of the weights.
"""

import json
import math
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clo.atomic import atomic_folder
from clo.errors import CloError
from clo.jsonfile import read_json
from clo.model.decoder import ATTENTION_PROJECTIONS
from clo.model.hf_folder import hf_key

DEFAULT_TARGETS = ATTENTION_PROJECTIONS
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# PEFT options we do not implement, with the value that means "off"
PLAIN_LORA = {
    "use_dora": False,
    "use_rslora": False,
    "bias": "none",
    "fan_in_fan_out": False,
    "lora_bias": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "modules_to_save": None,
    "alora_invocation_tokens": None,  # activated LoRA: applied only from those tokens on, which plain LoRA is not
}


def init_adapters(a: torch.Tensor, b: torch.Tensor) -> None:
    """PEFT's default start, in place: A [r, in] Kaiming-uniform, B [out, r] zero, so B A = 0."""
    with torch.no_grad():
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)


class LoRALinear(nn.Linear):
    """A frozen nn.Linear (same `weight`/`bias` names, so checkpoint keys do not change) plus B A.

    Built from `base` without copying: `weight` and `bias` are base's Parameters (meta device works).
    x [..., in] -> [..., out]. A and B take base's dtype; if you cast them (say to fp32), the LoRA
    path runs in their dtype and is added back in the input's.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # not nn.Linear.__init__: that would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.r, self.alpha, self.dropout_p, self.scaling = r, alpha, dropout, alpha / r
        device, dtype = base.weight.device, base.weight.dtype
        with torch.device("meta"):  # no default init: init_adapters is the one draw from the RNG
            self.lora_A = nn.Linear(base.in_features, r, bias=False, dtype=dtype)
            self.lora_B = nn.Linear(r, base.out_features, bias=False, dtype=dtype)
        self.lora_A.to_empty(device=device)
        self.lora_B.to_empty(device=device)
        init_adapters(self.lora_A.weight, self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.adapters_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged or not self.adapters_enabled:
            return out
        lora = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return out + (lora * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) · B @ A in fp32, shape [out, in] like `weight`."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:  # in place, so a shared weight Parameter stays shared
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_lora_param(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, under our names (`layers.0.self_attn.q_proj.lora_A.weight`)."""
    return {name: t for name, t in model.state_dict().items() if is_lora_param(name)}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _find_targets(model: nn.Module, targets, r, alpha, dropout) -> list[str]:
    """Validate and return the names of the plain nn.Linear modules whose last name part is in `targets`."""
    if not (isinstance(r, int) and r >= 1 and alpha > 0 and 0 <= dropout < 1):
        raise CloError(f"LoRA needs r >= 1, alpha > 0, 0 <= dropout < 1; got r={r}, alpha={alpha}, dropout={dropout}")
    if lora_layers(model):
        raise CloError("the model already has LoRA adapters; apply or load them onto the base model")
    targets = [targets] if isinstance(targets, str) else list(targets)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n.rpartition(".")[2] in targets]
    if not names:
        raise CloError(f"LoRA target_modules {targets} match no linear layer of the model")
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for name in names:
        if uses[id(model.get_submodule(name).weight)] > 1:
            raise CloError(f"LoRA target {name!r} shares its weight with another module (tied embeddings)")
    return names


def apply_lora(
    model: nn.Module, targets=DEFAULT_TARGETS, r: int = 8, alpha: float = 16, dropout: float = 0.0
) -> list[str]:
    """Wrap every nn.Linear named `*.{target}` in a LoRALinear, in place; freeze all but `lora_*`.

    Returns the wrapped module names, e.g. ["layers.0.self_attn.q_proj", ...].
    """
    names = _find_targets(model, targets, r, alpha, dropout)
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout))
    for name, p in model.named_parameters():
        p.requires_grad = is_lora_param(name)
    return names


@contextmanager
def disable_adapters(model: nn.Module):
    """Within the block every LoRALinear computes W x + b only: the frozen start model (reference policy)."""
    layers = list(lora_layers(model).values())
    if any(layer.merged for layer in layers):
        raise RuntimeError("disable_adapters: some adapters are merged into the weights; unmerge() them first")
    before = [layer.adapters_enabled for layer in layers]
    for layer in layers:
        layer.adapters_enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, before):
            layer.adapters_enabled = enabled


def merge_lora(model: nn.Module) -> list[str]:
    """Merge every adapter and put back plain nn.Linear modules (sharing the merged weight); returns their names."""
    layers = lora_layers(model)
    for name, layer in layers.items():
        layer.merge()
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight, plain.bias = layer.weight, layer.bias
        _replace(model, name, plain)
    return list(layers)


def _peft_key(name: str, matrix: str) -> str:
    return f"base_model.model.{hf_key(f'{name}.{matrix}.weight')}"


def save_adapter(model: nn.Module, out_dir: Path | str, base_model: str) -> Path:
    """Write adapter_config.json + adapter_model.safetensors as PEFT does, atomically (temp dir + os.replace)."""
    layers = lora_layers(model)
    settings = {(m.r, m.alpha, m.dropout_p) for m in layers.values()}
    if len(settings) != 1:
        raise ValueError(f"save_adapter needs LoRA layers with one shared r/alpha/dropout, found {sorted(settings)}")
    (r, alpha, dropout), = settings
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted({name.rpartition(".")[2] for name in layers}),
        "inference_mode": True,
        "init_lora_weights": True,
        **PLAIN_LORA,
    }
    tensors = {
        _peft_key(name, matrix): getattr(layer, matrix).weight.detach().contiguous().cpu()
        for name, layer in layers.items()
        for matrix in ("lora_A", "lora_B")
    }
    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
    return out_dir


def load_adapter(model: nn.Module, folder: Path | str) -> list[str]:
    """Apply LoRA with the folder's r/alpha/dropout/targets and load its A, B (PEFT format); returns module names.

    Everything is checked before the model is touched, so a bad folder leaves the model as it was.
    """
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CloError(f"{folder}: no {path.name} (not a PEFT LoRA adapter folder)")
    config = read_json(config_path)
    for field in ("peft_type", "r", "lora_alpha", "target_modules"):
        if field not in config:
            raise CloError(f"{config_path}: field {field!r} is missing")
    if config["peft_type"] != "LORA":
        raise CloError(f"{config_path}: field 'peft_type' is {config['peft_type']!r}, only 'LORA' is supported")
    for field, off in PLAIN_LORA.items():
        if config.get(field, off) not in (off, None):
            raise CloError(f"{config_path}: field {field!r} = {config[field]!r} is not supported (only {off!r})")
    targets = config["target_modules"]
    if not isinstance(targets, list):
        raise CloError(f"{config_path}: field 'target_modules' must be a list of names, got {targets!r}")
    r, alpha, dropout = config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0)
    try:
        names = _find_targets(model, targets, r, alpha, dropout)
        tensors = load_file(weights_path)
    except CloError as e:
        raise CloError(f"{config_path}: {e}") from None
    except SafetensorError as e:
        raise CloError(f"{weights_path}: unreadable safetensors file: {e}") from None

    expected = {}
    for name in names:
        base = model.get_submodule(name)
        expected[_peft_key(name, "lora_A")] = (r, base.in_features)
        expected[_peft_key(name, "lora_B")] = (base.out_features, r)
    for key, t in tensors.items():
        if key not in expected:
            raise CloError(f"{weights_path.name}: tensor {key!r} fits no LoRA target of this model")
        if tuple(t.shape) != expected[key]:
            raise CloError(
                f"{weights_path.name}: tensor {key!r} has shape {list(t.shape)}, "
                f"expected {list(expected[key])} (r={r} from {CONFIG_FILE})"
            )
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CloError(f"{weights_path.name}: tensor {missing[0]!r} is missing ({len(missing)} missing)")

    apply_lora(model, targets, r, alpha, dropout)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            for matrix in ("lora_A", "lora_B"):
                weight = getattr(layer, matrix).weight
                weight.copy_(tensors[_peft_key(name, matrix)].to(weight.device, weight.dtype))
    return names
