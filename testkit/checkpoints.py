"""Small evods checkpoints written directly, without a training run, for the tests of what reads them (converters,
the inference tools, the resume's readers)."""
import json
from pathlib import Path

import torch


def write_evods_checkpoint(folder: Path, module_extra=None, context_extra=None) -> None:
    """A small evods checkpoint as the manager lays it out (model states, run state, topology, config, marker)."""
    from evods.checkpoint import layout
    from evods.checkpoint.marker import Manifest, digest_file
    from evods.model import InternLMConfig, InternLMForCausalLM

    config = InternLMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2)
    model = InternLMForCausalLM(config)
    (folder / "deepspeed").mkdir(parents=True)
    torch.save({"module": {**model.state_dict(), **(module_extra or {})}},
               folder / "deepspeed" / "mp_rank_00_model_states.pt")
    context = {"step_count": 5, "batch_count": 5, "num_consumed_tokens": 10, "inf_nan_skip_batches": 0,
               "skipped_by_config": 0, **(context_extra or {})}
    torch.save(context, folder / layout.CONTEXT)
    torch.save({"num_consumed_samples_in_epoch": 5, "data_world_size": 1}, folder / layout.SAMPLER)
    torch.save({"lr": {"last_epoch": 5}, "beta2": {"cur_iter": 5}}, folder / layout.SCHEDULERS)
    (folder / layout.TOPOLOGY).write_text(json.dumps({"dp": 1, "pp": 1, "tp": 1, "num_layers": 1}))
    (folder / layout.MODEL_CONFIG).write_text(config.to_json_string())
    files = {str(path.relative_to(folder)): digest_file(str(path)) for path in folder.rglob("*") if path.is_file()}
    (folder / layout.marker_name(5)).write_bytes(Manifest(5, files).to_bytes())
