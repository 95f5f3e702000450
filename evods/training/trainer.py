"""The training loop: one InternEvo config in, a trained model and a metrics log out."""
import logging
import math
import random
import time
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from evods.checkpoint import CheckpointManager, TrainingParts
from evods.config import (
    ConfigError,
    TrainConfig,
    adamw_kwargs,
    build_deepspeed_config,
    check_device,
    check_topology,
    write_deepspeed_config,
)
from evods.config.checks import offloads_to_cpu_adam
from evods.data import BatchSkipper, batch_stats, build_train_loader, build_valid_loaders, check_tokenizer_fits
from evods.model.lora import add_lora, peft_adapter_config
from evods.model.registry import MODEL_INITIALIZER
from evods.monitor import RunMonitor, StepProfiler
from evods.monitor.plot import RUN_TIME_FORMAT
from evods.parallel import (
    ParallelLayout,
    apply_tensor_parallel,
    apply_ulysses,
    build_parallel_grid,
    parallel_seeds,
)
from evods.parallel.nodes import discover_nodes
from evods.parallel.zero import model_construction
from evods.progress import Progress

from .distributed import init_distributed
from .engine import StepOutcome, TrainEngine
from .flops import megatron_tflops, model_flops_per_token, peak_flops, tgs
from .loss import TokenMetrics, build_loss
from .memory import check_memory
from .metrics import MetricsSink, format_metrics_line, setup_logging
from .model_part import materialise_rank_part
from .schedules import Beta2Scheduler, LRScheduler
from .startup import launch_time, log_layout, log_parallel_setup, log_run_start
from .stopping import GracefulStop

logger = logging.getLogger("evods")


@dataclass
class TrainState:
    """Counters that move with the data, as InternEvo's TrainState."""

    batch_count: int = 0  # batches consumed, including skipped ones
    step_count: int = 0  # successful optimizer steps
    num_consumed_tokens: int = 0
    inf_nan_skip_batches: int = 0
    skipped_by_config: int = 0
    # one dict per trained batch: step, micro_num (its rows), loss, grad_norm, loss_scale, applied
    history: list = field(default_factory=list)

    def state_dict(self) -> dict:
        """The counters a checkpoint keeps (context.pt); the history stays with the run that made it."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "history"}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_runtime_rng(seed: int, layout: ParallelLayout) -> None:
    """InternEvo's runtime seeds: tensor/pipeline ranks offset the torch seed so dropout masks differ.

    Called after the model is built: initial weights come from the plain seed on every rank, so a model starts the
    same whatever the parallel layout.
    """
    torch.manual_seed(parallel_seeds(seed, layout)["TENSOR"])


def default_run_dir(job_name: str, launched: datetime) -> Path:
    """runs/{JOB_NAME}/{launch time}; the time is rank 0's (launch_time), so every rank writes to the same folder."""
    return Path("runs") / job_name / launched.strftime(RUN_TIME_FORMAT)


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path | None = None, seed: int = 1024,
                 ds_config_override: str | None = None, peak_tflops: float | None = None,
                 monitor: RunMonitor | None = None, profiling: bool = False):
        self.cfg = cfg
        rank, world = dist.get_rank(), dist.get_world_size()
        self.layout = check_topology(cfg, world, rank)
        self._owns_monitor = monitor is None
        self.monitor = monitor or RunMonitor.for_run(cfg, rank, world)
        check_device(cfg, device_type=_device_type())
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = (cfg.cudnn_deterministic,
                                                                              cfg.cudnn_benchmark)
        if cfg.model.tf32:  # "torch.tf32": fp32 weights, TF32 matmuls and convolutions (InternEvo's launch.py)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with torch.device("meta"):  # shapes only: a model too large for the machine is refused before it is built
            whole_model = build_model(cfg)
            self.num_parameters = whole_model.num_parameters()  # before tensor parallelism or ZeRO-3 splits them
            if cfg.lora is not None:  # the estimate counts gradients and optimizer states of the adapters only
                add_lora(whole_model, cfg.lora.spec())
            check_memory(cfg, whole_model, self.layout, _device_type())
        seed_everything(seed)
        log_parallel_setup(self.layout, seed, rank)
        launched = launch_time()
        self.run_dir = run_dir or default_run_dir(cfg.JOB_NAME, launched)

        self.nodes = discover_nodes()
        log_layout(self.nodes, self.layout)
        self.grid = build_parallel_grid(self.layout)
        ds_config = build_deepspeed_config(cfg, self.layout, ds_config_override)
        # The length of the rows the model trains on goes into the checkpoint's config.json, and so into the HF
        # export, where the inference tools show it: max_position_embeddings alone says nothing about it.
        whole_model.config.training_packed_length = cfg.data.seq_len * cfg.data.micro_bsz
        self.checkpoints = CheckpointManager(cfg.ckpt, self.layout, whole_model.config,
                                             cfg.source.text if cfg.source else None,
                                             on_failure=self.monitor.checkpoint_failed, nodes=self.nodes,
                                             adapter_config=peft_adapter_config(cfg.lora.spec()) if cfg.lora else None)
        tensor_group = self.grid.get_tensor_model_parallel_group()
        tensor_parallel = dict(embed_split_hidden=cfg.model.embed_split_hidden,
                               parallel_output=cfg.model.parallel_output,
                               sequence_parallel=self.layout.sequence_parallel)
        if self._builds_rank_part_only():  # the meta-device model above: only this rank's part gets memory
            model = materialise_rank_part(whole_model, self.checkpoints.loader.rank_part(cfg.model.embed_split_hidden),
                                          tensor_group, **tensor_parallel)
        else:  # seeded random init (the parity tests' start), any other checkpoint, LoRA, ZeRO-3
            with model_construction(self.layout.zero_stage, ds_config, self.grid.get_data_parallel_group()):
                model = build_model(cfg)
            model.config = whole_model.config  # the one the checkpoints save and compare
            self.checkpoints.loader.load_model_weights(model, frozen_base=cfg.lora is not None)
            if cfg.lora is not None:  # on the whole base, so that the adapters split with it
                add_lora(model, cfg.lora.spec())
            apply_tensor_parallel(model, tensor_group, self.layout.tp_rank, self.layout.tp, **tensor_parallel)
        self.checkpoints.loader.load_split_model_weights(model, cfg.model.embed_split_hidden,
                                                         frozen_base=cfg.lora is not None)
        if self.layout.sp > 1:
            apply_ulysses(model, self.grid.get_ulysses_group())
        seed_runtime_rng(seed, self.layout)
        kv_ratio = model.config.num_key_value_heads / model.config.num_attention_heads
        self.flops_per_token = model_flops_per_token(cfg.data.seq_len, cfg.model.hidden_size, cfg.model.num_layers,
                                                     cfg.model.vocab_size, cfg.model.mlp_ratio, kv_ratio=kv_ratio)
        self.peak = peak_flops(peak_tflops)

        if cfg.data.train_dataset:
            check_tokenizer_fits(cfg.data.train_dataset.tokenizer_path, cfg.model.vocab_size,
                                 f"the model of {cfg.source.path if cfg.source else 'the config'}")
        self.loader, self.sampler, self.dataset_types = build_train_loader(cfg.data, self.layout.dp_rank,
                                                                            self.layout.dp, cfg.data.num_worker)
        self.skip_batch = BatchSkipper(cfg.data.skip_ranges)
        self.token_metrics = TokenMetrics(num_types=len(self.dataset_types))
        loss_fn = build_loss(cfg, self.layout, model.lm_head, _device_type(), self.token_metrics, tensor_group,
                             self.grid.get_ulysses_group())
        self.engine = TrainEngine(model, self._make_optimizer, ds_config, self.layout, loss_fn, self.grid)
        self.lr_scheduler = LRScheduler(self.engine.optimizer, cfg.adam.lr, cfg.lr_scheduler)
        self.beta2_scheduler = Beta2Scheduler(self.engine.optimizer, cfg.beta2_scheduler)
        self.valid_loaders = build_valid_loaders(cfg.data, self.layout.dp_rank, self.layout.dp)
        self.state = TrainState()
        self.checkpoints.loader.restore(self._checkpoint_parts())
        # once loaded: after a fallback from a damaged checkpoint, the one actually loaded
        log_run_start(self.layout, launched, self.checkpoints.loader.loaded)
        self.profiler = None
        if profiling and self.layout.dp_rank == 0 and self.layout.tp_rank == 0:  # one trace per stage, as InternEvo
            worker = f"rank{rank}_dp{self.layout.dp_rank}_pp{self.layout.pp_rank}_tp{self.layout.tp_rank}"
            self.profiler = StepProfiler(self.engine.engine.module, self.run_dir / "traces", worker)
        self.sink = None
        if self.engine.is_log_rank:
            # The metrics line comes from the rank that sees the loss: the last pipeline stage, not always rank 0.
            # The whole run folder is its, so that it lies on one node's disk even without a shared file system.
            logger.setLevel(logging.INFO)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_deepspeed_config(ds_config, self.run_dir)
            tb_dir = Path(cfg.tensorboard_folder) if cfg.tensorboard_folder else self.run_dir / "tensorboard"
            self.sink = MetricsSink(self.run_dir, tb_dir if cfg.enable_tb else None)
        parallel = self.layout
        offloaded = [part for part, on in (("optimizer", parallel.offload_optimizer),
                                           ("parameters", parallel.offload_param)) if on]
        logger.info("run folder: %s; model parameters: %.2fM; DeepSpeed ZeRO-%d over %d data-parallel ranks%s",
                    self.run_dir, self.num_parameters / 1e6, parallel.zero_stage, parallel.zero_ranks,
                    f", {' and '.join(offloaded)} offloaded to host memory" if offloaded else "")

    def _builds_rank_part_only(self) -> bool:
        """An HF folder gives every weight of the model (no LoRA adapters to initialise) and nothing is partitioned
        by ZeRO-3 while it is built (`model_construction`): the rank builds only its part of the model."""
        return (self.cfg.lora is None and self.layout.zero_stage < 3
                and self.checkpoints.loader.starts_from_hf_folder())

    def _checkpoint_parts(self) -> TrainingParts:
        return TrainingParts(engine=self.engine.engine, context=self.state, sampler=self.sampler,
                             lr_scheduler=self.lr_scheduler, beta2_scheduler=self.beta2_scheduler)

    def _make_optimizer(self, params) -> torch.optim.Optimizer:
        """InternEvo's AdamW; under optimizer offload on GPUs DeepSpeed's CPU Adam in AdamW mode (the same update,
        vectorised on the host), which DeepSpeed requires there (evods.config.checks.offloads_to_cpu_adam)."""
        if offloads_to_cpu_adam(self.cfg, _device_type()):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(params, adamw_mode=True, **adamw_kwargs(self.cfg))
        return torch.optim.AdamW(params, **adamw_kwargs(self.cfg))

    def train(self) -> TrainState:
        """Train to total_steps. A stop signal (SIGTERM, SIGINT) finishes the running step, cuts validation short
        and saves the last finished step before anything else (see stopping.py for the launchers' time limits)."""
        stop = GracefulStop(speaks=self.engine.is_log_rank)
        try:
            self._train(stop)
            self.checkpoints.saver.close()  # waits for background uploads and writes the last checkpoint's marker
            if stop.requested and self.checkpoints.saver.saving:
                stop.saved(f"saved step {self.state.step_count}: its checkpoint is complete")
        finally:
            stop.close()
        self._log_summary()
        self.monitor.run_finished()
        return self.state

    def _train(self, stop: GracefulStop) -> None:
        data = self.cfg.data
        batches = iter(self.loader)
        self.monitor.run_started(dp=self.layout.dp, pp=self.layout.pp, tp=self.layout.tp,
                                 parameters=self.num_parameters, run_dir=self.run_dir)
        while self.state.step_count < data.total_steps:
            start = time.time()
            batch = next(batches)
            self.state.batch_count += 1
            if self.skip_batch(self.state.batch_count - 1):
                self.state.skipped_by_config += 1
                continue
            outcome = self.engine.train_step(batch)
            self._after_step(batch, outcome, time.time() - start)
            if self.profiler is not None:
                self.profiler.step()
            stopping = stop.agreed()
            if (not stopping and data.valid_every > 0 and self.state.step_count % data.valid_every == 0
                    and outcome.applied):
                stopping = self.validate(stop) is None
            if stopping:
                self.checkpoints.saver.save_on_stop(self.state.step_count, self._checkpoint_parts())
                logger.warning("stopped on request after %d optimizer steps", self.state.step_count)
                return
            if outcome.applied and self.checkpoints.saver.after_step(self.state.step_count, self._checkpoint_parts()):
                logger.warning("stopped by the stop file after %d optimizer steps", self.state.step_count)
                return

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
        if self.profiler is not None:
            self.profiler.close()
        if self._owns_monitor:
            self.monitor.close()

    def _log_summary(self) -> None:
        trained = [entry for entry in self.state.history if entry["applied"]]
        if trained:
            logger.info("finished: %d optimizer steps, %d skipped (inf/nan), %d batches skipped by skip_batches, "
                        "loss %.4f -> %.4f; metrics in %s", self.state.step_count, self.state.inf_nan_skip_batches,
                        self.state.skipped_by_config, trained[0]["loss"], trained[-1]["loss"], self.run_dir)
        if torch.cuda.is_available():
            logger.info("peak GPU memory: %.2f GiB allocated, %.2f GiB reserved",
                        torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30)

    def _after_step(self, batch: dict, outcome: StepOutcome, elapsed: float) -> None:
        state, data = self.state, self.cfg.data
        tokens_this_rank = batch["labels"].numel()
        rows = batch["labels"].shape[0]  # micro_num, or fewer during a ramp-up
        state.num_consumed_tokens += tokens_this_rank * self.layout.dp
        if outcome.applied:
            self.lr_scheduler.step()
            self.beta2_scheduler.step()
            state.step_count += 1
        else:
            state.inf_nan_skip_batches += 1
            logger.warning("Warning: skip parameter update at step %d (inf/nan gradients).", state.batch_count - 1)
        totals = self.token_metrics.reduce_and_reset(self.engine.data_parallel_group) \
            if self.engine.computes_loss else None
        state.history.append({"step": state.batch_count - 1, "micro_num": rows, "loss": outcome.loss,
                              "grad_norm": outcome.grad_norm, "loss_scale": outcome.loss_scale,
                              "applied": outcome.applied})
        self.monitor.step_done(state.batch_count - 1, state.step_count, outcome.loss, outcome.applied,
                               outcome.loss_scale)
        if self.sink is None or not outcome.applied:
            return
        world = self.layout.world
        global_batch = data.micro_bsz * rows * self.layout.dp
        achieved = self.flops_per_token * tokens_this_rank * self.layout.dp / elapsed / world
        metrics = {
            "tflops": megatron_tflops(elapsed, self.cfg.model.checkpoint, data.seq_len, self.cfg.model.hidden_size,
                                      self.cfg.model.num_layers, self.cfg.model.vocab_size, global_batch, world,
                                      self.cfg.model.mlp_ratio),
            "step": state.batch_count - 1,
            "loss": outcome.loss,
            "tgs (tokens/gpu/second)": tgs(tokens_this_rank, self.layout.dp, world, elapsed),
            "lr": self.engine.optimizer.param_groups[0]["lr"],
            "loss_scale": outcome.loss_scale,
            "grad_norm": outcome.grad_norm,
            "micro_num": rows,
            "num_consumed_tokens": state.num_consumed_tokens,
            "inf_nan_skip_batches": state.inf_nan_skip_batches,
            **batch_stats(batch["position_ids"]),
            "adam_beta2": self.beta2_scheduler.get_beta2(),
            "fwd_bwd_time": round(elapsed, 2),
            "zero_stage": self.layout.zero_stage,
        }
        if self.peak:
            metrics["mfu"] = round(achieved / self.peak, 4)
        metrics.update(_token_metric_values(totals, self.dataset_types))
        logger.info(format_metrics_line(metrics))
        self.monitor.metrics_logged(metrics)
        self.sink.write(metrics["step"], metrics)

    @torch.no_grad()
    def validate(self, stop: GracefulStop | None = None) -> dict | None:
        """Loss, accuracy and perplexity on every validation set; None when `stop` was requested meanwhile (the
        rest of validation is skipped, so the stop's checkpoint is written in time)."""
        results = {}
        for name, loader in self.valid_loaders.items():
            losses = []
            valid_metrics = TokenMetrics(num_types=1)
            self.engine.loss_fn.metrics, saved = valid_metrics, self.engine.loss_fn.metrics
            progress = Progress(f"validation on {name}", len(loader), "batches", logger)
            try:
                for batch in loader:
                    if stop is not None and stop.agreed():
                        logger.warning("validation on %s cut short by the stop request", name)
                        return None
                    losses.append(self.engine.eval_loss(batch["input_ids"], batch["position_ids"], batch["labels"],
                                                        batch["type_ids"]))
                    progress.advance()
            finally:
                self.engine.loss_fn.metrics = saved
            progress.finish()
            totals = valid_metrics.reduce_and_reset(self.engine.data_parallel_group)
            self.engine.share_from_last_stage(totals["tokens"])
            self.engine.share_from_last_stage(totals["correct"])
            loss = float(np.mean(losses)) if losses else float("nan")
            tokens = float(totals["tokens"].sum())
            results[name] = {f"val/{name}_loss": loss,
                             f"val/{name}_acc": float(totals["correct"].sum()) / max(tokens, 1.0),
                             f"val/{name}_plex": math.exp(min(loss, 50.0))}
            if self.sink is not None:
                logger.info("Validation on %s: step=%d %s", name, self.state.step_count,
                            " ".join(f"{k}={v}" for k, v in results[name].items()))
                self.sink.write(self.state.step_count, results[name])
        return results


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    """The whole model of `model_type` from the config's `model` dict, as InternEvo's MODEL_INITIALIZER."""
    try:
        return MODEL_INITIALIZER.get_module(cfg.model_type)(**cfg.model_dict)
    except (TypeError, ValueError) as error:  # the builder rejects the config's `model` dict
        where = cfg.source.path if cfg.source else "the config"
        raise ConfigError(f"{where}: model_type {cfg.model_type!r} with this `model` dict: {error}") from None


def _token_metric_values(totals: dict | None, dataset_types: list[str]) -> dict:
    if totals is None:
        return {}
    tokens = totals["tokens"]
    all_tokens = float(tokens.sum())
    values = {"acc": float(totals["correct"].sum()) / max(all_tokens, 1.0),
              "perplexity": math.exp(min(float(totals["loss_sum"].sum()) / max(all_tokens, 1.0), 50.0))}
    for type_id, name in enumerate(dataset_types):
        if tokens[type_id] > 0:
            values[f"loss/{name}"] = float(totals["loss_sum"][type_id] / tokens[type_id])
    return values


def _device_type() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def run(cfg: TrainConfig, launcher: str = "deepspeed", port: int | None = None, **trainer_kwargs) -> TrainState:
    init_distributed(launcher, port)
    setup_logging(dist.get_rank())
    try:
        monitor = RunMonitor.for_run(cfg, dist.get_rank(), dist.get_world_size())
        try:
            trainer = Trainer(cfg, monitor=monitor, **trainer_kwargs)
            try:
                state = trainer.train()
            finally:
                trainer.close()
            dist.barrier()  # every rank is done with the pipeline's send/receive before any tears its groups down
            return state
        except Exception as error:
            monitor.run_failed(error)  # the alert; the error still ends the run
            raise
        finally:
            monitor.close()
    finally:
        # Process groups left to interpreter shutdown can abort a rank ("terminate called without an active
        # exception", seen with pipeline runs under torchrun) after training succeeded.
        dist.destroy_process_group()
