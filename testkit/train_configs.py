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
