"""LoRA adapters on the model's projections: y = x Wᵀ + b + s · B(A(dropout(x))), W frozen.

The adapters follow peft's LoRA (peft.tuners.lora.layer.Linear): the factors are bias-free nn.Linear modules named
`lora_A` (in -> r) and `lora_B` (r -> out) beside the base weight, dropout applies to the adapter's input only, the
scaling s is lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), and a fresh adapter has A drawn as nn.Linear
draws its weight (Kaiming-uniform) and B zero, so training starts from the base model; init_lora_weights=False keeps
B random as well (peft's option for tests). evods does not wrap the model with peft itself: peft's layers hold the
base as `base_layer`, which would rename every base weight away from the Hugging Face names evods' checkpoints and
exports use, and peft has no layer for a tensor-parallel base, where the low-rank term must be added before the
base's all-reduce (`evods.parallel.layers`). The base keeps its names; the adapters add `<projection>.lora_A.weight`
and `<projection>.lora_B.weight`, the names of peft's adapter files.
"""
import math
from dataclasses import dataclass

import torch
from torch import nn

# evods' model core names its projections as Hugging Face's Llama does (evods.model.modeling_internlm)
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_FACTORS = ("lora_A", "lora_B")


@dataclass(frozen=True)
class LoraSpec:
    """The adapters to add; the fields are peft's LoraConfig's."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = LORA_TARGET_MODULES
    use_rslora: bool = False
    init_lora_weights: bool = True

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraAdaptable:
    """Mixin of a linear layer that may carry a LoRA adapter (`add_adapter`); `with_adapter(x, out)` adds its term to
    the layer's output `out` for the input `x` (unchanged without an adapter)."""

    def add_adapter(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, dropout: float) -> None:
        """Attach the factors A [r, in] and B [out, r] (this layer's parts of them), trainable."""
        self.lora_A = _factor(lora_a)
        self.lora_B = _factor(lora_b)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_scaling = scaling

    @property
    def has_adapter(self) -> bool:
        return "lora_A" in self._modules

    def with_adapter(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if not self.has_adapter:
            return out
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.lora_scaling


def _factor(weight: torch.Tensor) -> nn.Linear:
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = nn.Parameter(weight, requires_grad=True)
    return linear


class LoraLinear(LoraAdaptable, nn.Linear):
    """nn.Linear with a LoRA adapter; the same `weight` and `bias` (names and tensors) as the layer it replaces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.with_adapter(x, super().forward(x))


def add_lora(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Freeze every parameter of `model` and give each nn.Linear whose last name is in spec.target_modules an adapter
    (in place); returns the adapted modules' names. Draws the factors from torch's default generator in module order,
    so every rank seeded alike draws the same adapters, whatever the parallel layout applied later."""
    model.requires_grad_(False)
    adapted = []
    for name, module in list(model.named_modules()):
        if name.rpartition(".")[2] not in spec.target_modules or not isinstance(module, nn.Linear):
            continue
        lora_a = torch.empty(spec.r, module.in_features, dtype=module.weight.dtype, device=module.weight.device)
        lora_b = torch.empty(module.out_features, spec.r, dtype=module.weight.dtype, device=module.weight.device)
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))  # nn.Linear's (and peft's) draw for A
        if spec.init_lora_weights:
            nn.init.zeros_(lora_b)
        else:
            nn.init.kaiming_uniform_(lora_b, a=math.sqrt(5))
        with torch.device("meta"):
            adapted_module = LoraLinear(module.in_features, module.out_features, bias=module.bias is not None)
        adapted_module.weight, adapted_module.bias = module.weight, module.bias
        adapted_module.add_adapter(lora_a, lora_b, spec.scaling, spec.lora_dropout)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, adapted_module)
        adapted.append(name)
    if not adapted:
        raise ValueError(f"no linear layer of {type(model).__name__} is named one of lora target_modules "
                         f"{list(spec.target_modules)}; evods' models have {list(LORA_TARGET_MODULES)}")
    return adapted


def is_lora_parameter(name: str) -> bool:
    """A LoRA factor's parameter (`...q_proj.lora_A.weight`)."""
    return name.rpartition(".")[0].rpartition(".")[2] in LORA_FACTORS


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in model.state_dict().items() if is_lora_parameter(name)}


# peft's adapter folder: PeftModel.from_pretrained(base, folder) reads these two files
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what peft's saved keys start with: PeftModel.base_model (LoraModel).model


def peft_adapter_config(spec: LoraSpec, base_model_name_or_path: str | None = None) -> dict:
    """peft's adapter_config.json of `spec` (its LoraConfig, as LoraConfig.save_pretrained writes it)."""
    import peft

    config = peft.LoraConfig(r=spec.r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                             target_modules=list(spec.target_modules), use_rslora=spec.use_rslora,
                             task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path)
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}


def spec_of_adapter_config(config: dict) -> LoraSpec:
    return LoraSpec(r=config["r"], lora_alpha=config["lora_alpha"], lora_dropout=config.get("lora_dropout", 0.0),
                    target_modules=tuple(config["target_modules"]), use_rslora=config.get("use_rslora", False))


def merge_lora(weights: dict[str, torch.Tensor], spec: LoraSpec) -> dict[str, torch.Tensor]:
    """The base weights with each adapter folded in, W + (B @ A) * scaling (peft's merge rule, LoraLayer
    get_delta_weight), computed in fp32 and cast to W's dtype; the adapters' own keys are dropped."""
    merged = {name: tensor for name, tensor in weights.items() if not is_lora_parameter(name)}
    for name, lora_a in weights.items():
        if not name.endswith(".lora_A.weight"):
            continue
        module = name.removesuffix(".lora_A.weight")
        base = merged[f"{module}.weight"]
        delta = (weights[f"{module}.lora_B.weight"].float() @ lora_a.float()) * spec.scaling
        merged[f"{module}.weight"] = (base.float() + delta).to(base.dtype)
    return merged


def write_peft_adapter(folder: str, adapters: dict[str, torch.Tensor], adapter_config: dict) -> None:
    """A peft adapter folder (adapter_config.json, adapter_model.safetensors under peft's key names)."""
    import json
    import os

    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file({PEFT_PREFIX + name: tensor.contiguous() for name, tensor in adapters.items()},
              os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(folder, ADAPTER_CONFIG), "w") as f:
        json.dump(adapter_config, f, indent=2, sort_keys=True)
        f.write("\n")
