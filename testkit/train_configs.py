"""Small training configs for tests: configs/demo_cpu.py with sections overridden."""
from pathlib import Path

from evods.config import DataConfig, TrainConfig, load_config_file, parse_config

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.py"

TINY_MODEL = dict(hidden_size=64, num_layers=4, num_attention_heads=4, vocab_size=512, mlp_ratio=2)
# InternEvo's random data draws tokens below 200, so a 512-token vocabulary holds it.


def tiny_config(**sections) -> TrainConfig:
    """The demo config with a tiny model; each keyword is a section whose keys replace the demo's."""
    raw, source = load_config_file(DEMO_CONFIG)
    sections.setdefault("ckpt", {"enable_save_ckpt": False})  # the demo saves into demo_out/; tests opt in
    sections.setdefault("model", {})
    sections["model"] = {**TINY_MODEL, **sections["model"]}
    for name, values in sections.items():
        raw[name] = {**raw[name], **values} if isinstance(raw.get(name), dict) else values
    return parse_config(raw, source)


def data_config(**keys) -> DataConfig:
    """The demo config's `data` section with `keys` replacing its keys, as the data pipeline gets it from a loaded
    config (defaults filled in, rampup_batch_size and skip_batches parsed)."""
    return tiny_config(data=keys).data


# DeepSpeed keeps parameters below 1e5 elements whole under ZeRO-3 (persistent), which would be all of a tiny model's;
# below 100 elements, as a real model's norms and biases, its matrices are sharded.
ZERO3_PERSISTENCE = {"zero_optimization": {"stage3_param_persistence_threshold": 100}}


def zero3_ds_config(folder: str) -> str:
    """A --ds_config file with ZERO3_PERSISTENCE in `folder`, one per rank (the ranks write at once)."""
    import json

    import torch.distributed as dist

    path = Path(folder) / f"ds_config_rank{dist.get_rank() if dist.is_initialized() else 0}.json"
    path.write_text(json.dumps(ZERO3_PERSISTENCE))
    return str(path)
