"""The DeepSpeed engine behind one training step.

pipeline size 1: the Hugging Face model itself under ZeRO-1. pipeline size > 1: the model's stage layers in a
`deepspeed.pipe.PipelineModule` (1F1B), balanced by decoder layers. Either way a step consumes the packed rows of its
batch (micro_num, or fewer during a ramp-up) and reports the same numbers, so the loop does not care which one runs.
The model (or last stage) stops at the final hidden states; the loss applies the output head (`PackedLoss`), so the
[tokens, vocab] logits need not exist.
"""
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.pipe import PipelineModule

from evods.parallel import ParallelGrid, ParallelLayout, build_parallel_grid, build_process_topology, pipeline_layers
from evods.parallel.zero import gathered, whole_for_gradient

from .loss import PackedLoss

# The name DeepSpeed's "type:" partition method matches, so each stage gets an equal share of decoder layers.
DECODER_STAGE_PATTERN = "type:DecoderStage"


@dataclass
class StepOutcome:
    loss: float  # mean over the step's micro-batches and data-parallel ranks
    grad_norm: float | None  # global L2 norm of unscaled gradients, before clipping
    loss_scale: float
    applied: bool  # False when DeepSpeed skipped the update (inf/nan gradients)


def _micro_batches(batch: dict) -> list:
    """Split a [micro_num, P] batch into the ((inputs), (targets)) rows a DeepSpeed pipeline pulls."""
    rows = batch["input_ids"].shape[0]
    return [((batch["input_ids"][i:i + 1], batch["position_ids"][i:i + 1]),
             (batch["labels"][i:i + 1], batch["type_ids"][i:i + 1])) for i in range(rows)]


class TrainEngine:
    def __init__(self, model: torch.nn.Module, make_optimizer: Callable[[Iterable], torch.optim.Optimizer],
                 ds_config: dict, layout: ParallelLayout, loss_fn: PackedLoss, grid: ParallelGrid | None = None):
        """`model` is already tensor-parallel when layout.tp > 1, over `grid`'s tensor group (built here if not
        given); `loss_fn` applies its lm_head."""
        self.layout = layout
        grid = grid or build_parallel_grid(layout)
        self.loss_fn = loss_fn
        self.pipelined = layout.pp > 1
        if self.pipelined:
            # A PipelineModule builds its own grid from the topology; DeepSpeed then requires mpu=None.
            module = PipelineModule(layers=pipeline_layers(model, skip_lm_head=True), loss_fn=loss_fn,
                                    topology=build_process_topology(layout), partition_method=DECODER_STAGE_PATTERN)
        else:
            module = model
        params = [p for p in module.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=make_optimizer(params),
                                                                 config=ds_config,
                                                                 mpu=None if self.pipelined else grid)
        whole_for_gradient(loss_fn.head.weight)
        self.data_parallel_group = grid.get_data_parallel_group()
        # The pipeline engine sends activation shapes once and reuses its receive buffers; validation rows have
        # another shape, so the buffers are reset on every switch between training and evaluation.
        self._pipe_shapes_are_eval = False

    @property
    def is_log_rank(self) -> bool:
        return self.layout.is_log_rank

    @property
    def computes_loss(self) -> bool:
        return self.engine.is_last_stage() if self.pipelined else True

    def loss_scale(self) -> float:
        scale = getattr(self.engine.optimizer, "cur_scale", 1.0)
        return float(scale)

    def train_step(self, batch: dict) -> StepOutcome:
        self.engine.train()
        self._accumulate_over(batch["input_ids"].shape[0])
        if self.pipelined:
            if self._pipe_shapes_are_eval:
                self.engine.reset_activation_shape()
                self._pipe_shapes_are_eval = False
            loss = float(self.engine.train_batch(iter(_micro_batches(batch))))
        else:
            loss = self._train_step_plain(batch)
        return StepOutcome(loss=loss, grad_norm=self._grad_norm(), loss_scale=self.loss_scale(),
                           applied=self.engine.was_step_applied())

    def _accumulate_over(self, rows: int) -> None:
        """Make this step one optimizer update over `rows` micro-batches. DeepSpeed fixes gradient_accumulation_steps
        at initialize, but a ramp-up step (or a pass's short last batch) has fewer rows, as InternEvo's schedulers
        take the count from each batch. Setting the batch size per step makes DeepSpeed divide each micro-batch loss
        by this step's count, and makes the pipeline engine run that many micro-batches (its set_train_batch_size
        sets micro_batches)."""
        if rows != self.engine.gradient_accumulation_steps():
            self.engine.set_train_batch_size(rows * self.engine.train_micro_batch_size_per_gpu() *
                                             self.engine.dp_world_size)

    def _train_step_plain(self, batch: dict) -> float:
        total = torch.zeros((), dtype=torch.float64)
        device = self.engine.device  # the pipeline engine moves its inputs itself; a plain engine does not
        micro_batches = _micro_batches(batch)
        for index, (inputs, targets) in enumerate(micro_batches):
            # DeepSpeed counts micro-steps over the whole run, so its own boundary is right only while every step has
            # the same number of rows: the boundary is this batch's last row (the pipeline engine sets its own).
            self.engine.set_gradient_accumulation_boundary(index == len(micro_batches) - 1)
            hidden = self.engine(input_ids=inputs[0].to(device), position_ids=inputs[1].to(device),
                                 skip_lm_head=True).last_hidden_state
            loss = self._loss(hidden, tuple(t.to(device) for t in targets))
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed applies the update only at the accumulation boundary
            total += loss.detach().double().cpu()
        return self._mean_over_data_parallel(total / batch["input_ids"].shape[0])

    def _mean_over_data_parallel(self, value: torch.Tensor) -> float:
        """The mean over DeepSpeed's data-parallel group; under isp each rank's loss is sp times its tokens' share
        (PackedLoss), so the mean over the dp × sp ranks is the mean over the dp rows."""
        if self.layout.zero_ranks > 1:
            dist.all_reduce(value, group=self.data_parallel_group)
            value /= self.layout.zero_ranks
        return float(value)

    def share_from_last_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        """Give every pipeline stage the values only the last stage computed (e.g. validation accuracy)."""
        if self.pipelined:
            dist.broadcast(tensor, src=self.engine._loss_stage_global_rank(),
                           group=self.engine.mpu.get_pipe_parallel_group())
        return tensor

    def _grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    @torch.no_grad()
    def eval_loss(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                  type_ids: torch.Tensor) -> float:
        """Mean loss of one validation batch over the data-parallel ranks, the same on every rank."""
        self.engine.eval()
        if self.pipelined:
            rows = [((input_ids, position_ids), (labels, type_ids))]
            self.engine.reset_activation_shape()
            self._pipe_shapes_are_eval = True
            return float(self.engine.eval_batch(iter(rows), num_micro_batches=1))
        device = self.engine.device
        hidden = self.engine(input_ids=input_ids.to(device), position_ids=position_ids.to(device),
                             skip_lm_head=True).last_hidden_state
        loss = self._loss(hidden, (labels.to(device), type_ids.to(device)))
        return self._mean_over_data_parallel(loss.detach().double().cpu())

    def _loss(self, hidden: torch.Tensor, targets: tuple) -> torch.Tensor:
        """The loss applies lm_head's weight outside lm_head's forward, around which alone ZeRO-3 gathers it: it is
        gathered here for the loss, which also computes its gradient (the chunked and Liger kernels do so in the
        forward), so the backward needs it whole only to accumulate that gradient (`whole_for_gradient`)."""
        with gathered([self.loss_fn.head.weight]):
            return self.loss_fn(hidden, targets)
