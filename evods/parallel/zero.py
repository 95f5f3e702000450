"""What DeepSpeed's ZeRO-3 (parallel.zero.stage=3, or InternEvo's zero1.fsdp=True) changes in how evods builds and
uses a model.

ZeRO-1 and ZeRO-2 shard the optimizer states (and ZeRO-2 the gradients) inside DeepSpeed's optimizer: the model is
built and used as always. ZeRO-3 also shards every parameter over the data-parallel ranks, which reaches outside:
- the model is built under `deepspeed.zero.Init`, so no rank ever holds it whole: each module's parameters are
  sharded as soon as that module exists. The weights are the ones an unsharded build makes from the same seed,
  because transformers' weight initialisation (which runs after the modules exist) is run here on each module's
  gathered parameters, in fp32, in transformers' order (`_gathered_weight_init`);
- DeepSpeed gathers a module's parameters only around that module's forward and backward. The loss applies
  lm_head's weight itself, outside lm_head's forward (evods.training.loss: the logits are never built whole), so
  the engine gathers that weight for the loss (`gathered`) and for the accumulation of its gradient
  (`whole_for_gradient`); weights are loaded into a built model through `gathered` too;
- sizes come from `ds_shape`: a sharded parameter's own shape is that of its empty placeholder.
Everything here is a no-op for parameters that are not sharded, so callers need not ask which stage runs.
"""
import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def is_sharded(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter: its values live in shards over the data-parallel ranks (`ds_tensor`)."""
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> torch.Size:
    return param.ds_shape if is_sharded(param) else param.shape


def count_parameters(model: nn.Module) -> int:
    return sum(param.ds_numel if is_sharded(param) else param.numel() for param in model.parameters())


def gathered(params: list[torch.Tensor], modifier_rank: int | None = None):
    """The ZeRO-3 `params` whole within the block (DeepSpeed's GatheredParameters), sharded again after it.
    `modifier_rank`: the rank whose changes are kept (None: changes are discarded). Parameters that are whole
    already are left alone: unsharded ones, and those DeepSpeed keeps whole for good (its persistent parameters,
    smaller than stage3_param_persistence_threshold), which it would not gather again once sharded."""
    if not any(is_sharded(param) for param in params):
        return contextlib.nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    wanted = [param for param in params if is_sharded(param) and param.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    return deepspeed.zero.GatheredParameters(wanted, modifier_rank=modifier_rank) if wanted else \
        contextlib.nullcontext()


def whole_for_gradient(param: torch.Tensor) -> None:
    """Let autograd accumulate a gradient into the ZeRO-3 `param` outside its module's backward (where DeepSpeed
    would gather it): autograd shapes the gradient after the parameter as it is then, and a sharded parameter is an
    empty placeholder. A hook gathers it when its gradient has been computed, and another shards it again after
    DeepSpeed's own post-accumulation hook (registered when the engine was built, so it runs first) has reduced the
    gradient. Call after deepspeed.initialize; a parameter that is not sharded, or whole already, is left alone."""
    if not is_sharded(param):
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    gathered_here = []

    def gather(grad: torch.Tensor) -> torch.Tensor:
        if param.ds_status == ZeroParamStatus.NOT_AVAILABLE:
            param.all_gather()
            gathered_here.append(True)
        return grad

    def shard_again(_) -> None:
        if gathered_here:
            gathered_here.clear()
            param.partition()

    param.register_hook(gather)
    param.register_post_accumulate_grad_hook(shard_again)


@contextlib.contextmanager
def model_construction(stage: int, ds_config: dict, data_parallel_group) -> Iterator[None]:
    """The context to build the model in: under ZeRO-3 every module's parameters are sharded over
    `data_parallel_group` as soon as the module exists (deepspeed.zero.Init, with the run's DeepSpeed config: its
    dtype and parameter offload)."""
    if stage != 3:
        yield
        return
    import deepspeed

    # mem_efficient_linear would replace torch.nn.functional.linear for the rest of the process (DeepSpeed leaves it
    # so); ZeRO-3's module hooks gather the weights for the backward without it.
    with deepspeed.zero.Init(data_parallel_group=data_parallel_group, config_dict_or_path=ds_config,
                             mem_efficient_linear=False), _gathered_weight_init():
        yield


@contextlib.contextmanager
def _gathered_weight_init() -> Iterator[None]:
    """transformers initialises weights after the modules exist (post_init -> `_initialize_weights` per module,
    children first); under zero.Init their parameters are empty shards by then, so the initialisation would draw
    nothing and leave the constructors' values. Within this block each module's parameters (and its direct
    children's, which `_init_weights` may touch, as transformers' own ZeRO-3 initialisation gathers them) are
    gathered around it and initialised in fp32 on every rank from the same seed, as an unsharded build does, then
    cast back; rank 0's result is kept (all ranks draw the same). The constructors' own draws (nn.Linear's
    kaiming init) happen on whole tensors under zero.Init already, so the random stream stays the unsharded build's.
    transformers' class method is swapped for the duration of the build only."""
    from transformers import PreTrainedModel

    initialise = PreTrainedModel._initialize_weights

    def initialise_gathered(model, module, *args, **kwargs):
        if getattr(module, "_is_hf_initialized", False):  # transformers skips it: no need to gather
            return initialise(model, module, *args, **kwargs)
        params = [*module.parameters(recurse=False),
                  *(param for child in module.children() if not isinstance(child, PreTrainedModel)
                    for param in child.parameters(recurse=False))]
        with gathered(params, modifier_rank=0), torch.no_grad():
            dtypes = [param.dtype for param in params]
            for param in params:
                param.data = param.data.float()
            initialise(model, module, *args, **kwargs)
            for param, dtype in zip(params, dtypes):
                param.data = param.data.to(dtype)

    PreTrainedModel._initialize_weights = initialise_gathered
    try:
        yield
    finally:
        PreTrainedModel._initialize_weights = initialise
