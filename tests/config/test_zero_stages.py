"""DeepSpeed ZeRO-2/3 and CPU offload from the training config (issue: ZeRO-2 and ZeRO-3 with CPU offload): InternEvo's
`zero1=dict(fsdp=True)` and evods' `parallel.zero`, what they put in the DeepSpeed JSON, and the combinations
DeepSpeed or evods cannot run, each one line when the config loads."""
import json
import re

import pytest

from evods.config import ConfigError, build_deepspeed_config, check_device, check_topology, load_config
from evods.config.checks import cpu_adam_problem

TINY = """\
data = dict(seq_len=16, micro_num=2, micro_bsz=1, total_steps=10)
model = dict(num_attention_heads=4, hidden_size=32, num_layers=2, vocab_size=64, mlp_ratio=2, dtype="torch.float32")
ckpt = dict(enable_save_ckpt=False)
"""


def config(tmp_path, parallel: str, extra: str = ""):
    path = tmp_path / "cfg.py"
    path.write_text(TINY + f"parallel = {parallel}\n" + extra)
    return load_config(path)


def refusal(tmp_path, parallel: str, extra: str = "") -> str:
    with pytest.raises(ConfigError) as refused:
        config(tmp_path, parallel, extra)
    assert "\n" not in str(refused.value)
    return str(refused.value)


def test_internevo_fsdp_and_evods_key_select_the_stage_and_offload(tmp_path):
    assert config(tmp_path, "dict(zero1=8)").parallel.zero.stage == 1  # the default, as before
    fsdp = config(tmp_path, "dict(zero1=dict(size=-1, fsdp=True))")
    assert fsdp.parallel.zero.stage == 3 and check_topology(fsdp, 4).zero_stage == 3
    assert build_deepspeed_config(fsdp, check_topology(fsdp, 4))["zero_optimization"]["stage"] == 3
    assert config(tmp_path, "dict(zero1=dict(size=-1, fsdp=True), zero=dict(stage=3))").parallel.zero.stage == 3
    offloaded = config(tmp_path, "dict(zero=dict(stage=3, offload_optimizer=True, offload_param=True))")
    ds = build_deepspeed_config(offloaded, check_topology(offloaded, 2))
    assert ds["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 32 * 32,
                                       "stage3_prefetch_bucket_size": 921, "stage3_param_persistence_threshold": 320,
                                       "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
    # evods hands DeepSpeed the optimizer (CPU Adam on GPUs, torch's AdamW where the accelerator is the CPU)
    assert ds["zero_force_ds_cpu_optimizer"] is False
    stage2 = config(tmp_path, "dict(zero=dict(stage=2, offload_optimizer=True))")
    two = build_deepspeed_config(stage2, check_topology(stage2, 2))
    assert two["zero_optimization"]["stage"] == 2 and "offload_param" not in two["zero_optimization"]


def test_zero3_sizes_its_buckets_from_the_model_and_other_stages_keep_internevos_bucket(tmp_path, caplog):
    # DeepSpeed's stage 3 allocates its whole reduce bucket up front: InternEvo's 512M elements (2 GiB in fp32) would
    # outweigh what ZeRO-3 saves, so it is capped at hidden_size² (transformers' "auto"); stages 1/2 fill it lazily
    internevo_bucket = "hybrid_zero_optimizer = dict(reduce_bucket_size=512 * 1024 * 1024)\n"
    for parallel, bucket in [("dict(zero=dict(stage=1))", 512 * 1024**2), ("dict(zero=dict(stage=2))", 512 * 1024**2),
                             ("dict(zero=dict(stage=3))", 32 * 32), ("dict(zero1=dict(size=-1, fsdp=True))", 32 * 32)]:
        cfg = config(tmp_path, parallel, internevo_bucket)
        zero = build_deepspeed_config(cfg, check_topology(cfg, 2))["zero_optimization"]
        assert zero["reduce_bucket_size"] == bucket, parallel
        assert ("stage3_prefetch_bucket_size" in zero) == (zero["stage"] == 3)
    # a smaller bucket than the cap is kept
    cfg = config(tmp_path, "dict(zero=dict(stage=3))", "hybrid_zero_optimizer = dict(reduce_bucket_size=100)\n")
    assert build_deepspeed_config(cfg, check_topology(cfg, 2))["zero_optimization"]["reduce_bucket_size"] == 100
    # the prefetch and persistence sizes may be tuned in a DeepSpeed JSON (a warning names what it replaces)
    override = tmp_path / "ds.json"
    override.write_text(json.dumps({"zero_optimization": {"stage3_prefetch_bucket_size": 5000}}))
    with caplog.at_level("WARNING", logger="evods.config"):
        zero = build_deepspeed_config(cfg, check_topology(cfg, 2), override_path=override)["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == 5000
    assert "zero_optimization.stage3_prefetch_bucket_size=5000 overrides 921" in caplog.text


def test_a_deepspeed_json_merges_but_cannot_change_the_stage_or_offload(tmp_path):
    cfg = config(tmp_path, "dict(zero=dict(stage=2))")
    override = tmp_path / "ds.json"
    override.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True,
                                                          "contiguous_gradients": False}}))
    merged = build_deepspeed_config(cfg, check_topology(cfg, 2), override_path=override)["zero_optimization"]
    assert merged["overlap_comm"] is True and merged["contiguous_gradients"] is False and merged["stage"] == 2
    for content, key, wanted in [
        ({"zero_optimization": {"stage": 3}}, r"zero_optimization\.stage=3",
         r" \(parallel\.zero\.stage gives 2\)"),
        ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
         r"zero_optimization\.offload_optimizer\.device='cpu'", ""),
    ]:
        override.write_text(json.dumps(content))
        with pytest.raises(ConfigError) as refused:
            build_deepspeed_config(cfg, check_topology(cfg, 2), override_path=override)
        assert re.search(f"{key} conflicts with the training config{wanted}; remove it", str(refused.value)), \
            str(refused.value)
        assert "set parallel.zero" in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("parallel, extra, message", [
    ("dict(zero=dict(stage=3), pipeline=2)", "",
     r"cfg\.py:4: parallel\.zero\.stage=3 cannot run with parallel\.pipeline size 2: DeepSpeed's pipeline engine "
     r".* runs ZeRO-1 only; use pipeline=1 or ZeRO stage 1"),
    ("dict(zero=dict(stage=2), pipeline=2)", "", r"parallel\.zero\.stage=2 cannot run with parallel\.pipeline size 2"),
    ("dict(zero1=dict(size=-1, fsdp=True), pipeline=dict(size=2))", "",
     r"parallel\.zero1\.fsdp=True \(ZeRO-3\) cannot run with parallel\.pipeline size 2"),
    ("dict(zero=dict(stage=3), tensor=2)", "",
     r"parallel\.zero\.stage=3 cannot run with parallel\.tensor size 2: .* use ZeRO stage 2 with tensor "
     r"parallelism, or tensor=1"),
    ("dict(zero1=dict(size=-1, fsdp=True), zero=dict(stage=2))", "",
     r"parallel\.zero\.stage=2 contradicts parallel\.zero1\.fsdp=True, which evods runs as ZeRO-3"),
    ("dict(zero=dict(stage=2, offload_param=True))", "", r"offload_param=True needs ZeRO stage 3"),
    ("dict(zero=dict(offload_optimizer=True))", "", r"offload_optimizer=True needs ZeRO stage 2 or 3"),
    ("dict(zero=dict(stage=4))", "", r"parallel\.zero\.stage must be None or 1, 2 or 3, got 4"),
    ("dict(zero=dict(stage=3))", 'loss = dict(kernel="full")\n',
     r"loss\.kernel='full' .* ZeRO-3 .* use 'chunked'"),
])
def test_combinations_deepspeed_or_evods_cannot_run_are_one_line(tmp_path, parallel, extra, message):
    assert re.search(message, refusal(tmp_path, parallel, extra))


def test_offload_without_deepspeeds_cpu_adam_op_is_one_line_at_config_time(tmp_path):
    cfg = config(tmp_path, "dict(zero=dict(stage=3, offload_optimizer=True))")
    missing = "the installed DeepSpeed lacks the cpu_adam op and no C++ compiler (c++) can build it"
    with pytest.raises(ConfigError) as refused:
        check_device(cfg, "cuda", flash_attn_available=False, find_cpu_adam_problem=lambda: missing)
    assert re.fullmatch(r".*cfg\.py:4: parallel\.zero\.offload_optimizer=True steps the optimizer with DeepSpeed's "
                        r"CPU Adam, but " + re.escape(missing) + r"; reinstall deepspeed with DS_BUILD_CPU_ADAM=1 "
                        r"\(or install ninja and a C\+\+ compiler\), or set offload_optimizer=False",
                        str(refused.value)), str(refused.value)
    # on the CPU accelerator the op is not needed: torch's AdamW steps the shards
    check_device(cfg, "cpu", find_cpu_adam_problem=lambda: missing)


def test_the_cpu_adam_check_looks_at_what_a_jit_build_needs(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert "lacks the cpu_adam op and " in cpu_adam_problem()
