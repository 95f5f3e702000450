"""Loading, validating and normalising InternEvo-style configs (configs/*.py and the errors users get)."""
import logging
import math
import re
from pathlib import Path

import pytest
import torch

from evods.config import CPU_FP16_ENV, ConfigError, check_device, check_topology, load_config
from evods.data import Rampup
from evods.model import MODEL_INITIALIZER, config_from_model_dict
from evods.parallel import ParallelLayout
from testkit.paths import REPO

CONFIGS = REPO / "configs"

# The smallest valid config; tests append lines that replace a section.
TINY = """\
data = dict(seq_len=16, micro_num=2, micro_bsz=1, total_steps=10)
model = dict(num_attention_heads=4, hidden_size=32, num_layers=2, vocab_size=64, mlp_ratio=8 / 3,
             dtype="torch.float32")
ckpt = dict(enable_save_ckpt=False)
"""


def load_text(tmp_path: Path, text: str):
    path = tmp_path / "cfg.py"
    path.write_text(text)
    return load_config(path)


def test_7b_sft_matches_the_quickstart():
    cfg = load_config(CONFIGS / "7B_sft.py")  # no model is built: this is config only
    assert cfg.JOB_NAME == "7b_train" and cfg.model_type == "INTERNLM"
    assert cfg.constants["SEQ_LEN"] == 2048 and cfg.constants["MODEL_ONLY_FOLDER"] == "local:llm_ckpts/xxxx"
    assert cfg.source.text.startswith('JOB_NAME = "7b_train"')

    data = cfg.data
    assert (data.seq_len, data.micro_num, data.micro_bsz, data.packed_length) == (2048, 4, 2, 4096)
    assert (data.valid_micro_num, data.valid_every, data.total_steps, data.min_length) == (4, 50, 50000, 50)
    assert data.train_folder is None and data.pack_sample_into_one is False
    assert (data.empty_cache_and_diag_interval, data.diag_outlier_ratio) == (10, 1.1)

    model = cfg.model
    assert (model.num_attention_heads, model.hidden_size, model.num_layers, model.vocab_size) == (32, 4096, 32, 103168)
    assert model.mlp_ratio == 8 / 3 and model.checkpoint == 0.0 and model.dtype == torch.float16
    assert model.use_flash_attn and model.num_chunks == 1 and model.embed_split_hidden
    assert cfg.model_dict["dtype"] == torch.float16 and cfg.model_dict["norm_type"] == "rmsnorm"

    assert (cfg.parallel.zero1.size, cfg.parallel.pipeline.size, cfg.parallel.tensor.size) == (8, 1, 1)
    assert cfg.parallel.pipeline.interleaved_overlap and not cfg.parallel.sequence_parallel
    assert check_topology(cfg, 8) == ParallelLayout(dp=8, pp=1, tp=1)

    # enable_save_ckpt=False overwrites the saving keys, as launch.py does
    ckpt = cfg.ckpt
    assert ckpt.checkpoint_every == math.inf and ckpt.oss_snapshot_freq == math.inf
    assert ckpt.save_ckpt_folder is None and ckpt.async_upload is False and ckpt.async_upload_tmp_folder is None
    assert ckpt.load_ckpt_info.path == "local:llm_ckpts/xxxx" and ckpt.load_ckpt_info.content == ("model",)
    assert ckpt.auto_resume is True

    assert cfg.grad_scaler.fp16.initial_scale == 2**16 and cfg.grad_scaler.hysteresis == 2
    assert cfg.hybrid_zero_optimizer.clip_grad_norm == 1.0
    assert (cfg.adam.lr, cfg.adam.adam_beta2, cfg.adam.weight_decay) == (1e-4, 0.95, 0.01)
    assert (cfg.lr_scheduler.total_steps, cfg.lr_scheduler.warmup_steps, cfg.lr_scheduler.eta_min) == (50000, 500, 1e-5)
    assert (cfg.beta2_scheduler.init_beta2, cfg.beta2_scheduler.c) == (0.95, 0)
    assert cfg.monitor.alert.enable_feishu_alert is False
    assert cfg.enable_tb and not cfg.cudnn_deterministic


@pytest.mark.parametrize("name", ["demo_cpu.py", "demo_cpu_data.py", "demo_cpu_resume.py", "demo_cpu_internlm2.py"])
def test_demo_configs_validate_for_two_cpu_ranks(name):
    cfg = load_config(CONFIGS / name)
    assert check_topology(cfg, 2).dp == 2
    check_device(cfg, "cpu", flash_attn_available=False)
    # the demo saves its last step (tools/demo.sh converts it to HF) and always starts afresh
    assert cfg.ckpt.checkpoint_every == cfg.data.total_steps and cfg.ckpt.auto_resume is False
    assert cfg.data.valid_every == 0
    assert cfg.data.train_folder == ("data/train" if name == "demo_cpu_data.py" else None)
    # the run on real data keeps its checkpoints apart from the demo's, which the resume config continues
    folders = {"demo_cpu_data.py": "local:demo_out/ckpt_data", "demo_cpu_internlm2.py": "local:demo_out/ckpt_internlm2"}
    assert cfg.ckpt.save_ckpt_folder == folders.get(name, "local:demo_out/ckpt")


def test_internlm2_demo_config_builds_an_internlm2():
    cfg = load_config(CONFIGS / "demo_cpu_internlm2.py")
    model = config_from_model_dict(cfg.model_dict)
    assert cfg.model_type == "INTERNLM2" and (model.num_attention_heads, model.num_key_value_heads) == (8, 2)
    assert (model.bias, model.rope.base, model.intermediate_size) == (False, 1e6, 1024)
    # InternLM2's chat format (ChatML) by its model type, in the config and in the model its builder makes
    assert cfg.model.chat_template == "internlm2"
    assert MODEL_INITIALIZER.get_module(cfg.model_type)(**cfg.model_dict).config.chat_template == "internlm2"
    # the rest is the v1 demo's
    assert cfg.data == load_config(CONFIGS / "demo_cpu.py").data


def test_chat_demo_config_fine_tunes_the_demo_model_in_internlm2s_format():
    demo, chat = load_config(CONFIGS / "demo_cpu.py"), load_config(CONFIGS / "demo_cpu_chat.py")
    assert check_topology(chat, 2).dp == 2 and demo.model.chat_template == "internlm"  # the default
    assert (chat.model.chat_template, chat.model.vocab_size) == ("internlm2", 92544)  # tokenizer_internlm2.model's
    assert (chat.data.train_folder, chat.data.valid_folder) == ("data/chat/train", "data/chat/valid")
    assert chat.ckpt.checkpoint_every == chat.data.total_steps == chat.lr_scheduler.total_steps
    assert chat.model_dict["chat_template"] == "internlm2"


def test_resume_config_continues_the_demo_from_its_last_step():
    demo, resume = load_config(CONFIGS / "demo_cpu.py"), load_config(CONFIGS / "demo_cpu_resume.py")
    info = resume.ckpt.load_ckpt_info
    assert (info.path, info.content, info.ckpt_type) == (f"local:demo_out/ckpt/{demo.data.total_steps}", ("all",),
                                                         "evods")
    assert resume.data.total_steps == resume.lr_scheduler.total_steps == 2 * demo.data.total_steps
    assert resume.model == demo.model and resume.data.micro_num == demo.data.micro_num


def test_unknown_nested_key_names_it_and_suggests(tmp_path):
    text = TINY.replace("micro_num=2", "micro_nun=2")
    with pytest.raises(ConfigError, match=r"cfg\.py:1: unknown key 'data\.micro_nun'; did you mean data\.micro_num\?"):
        load_text(tmp_path, text)


def test_unknown_lowercase_top_level_name_suggests_but_uppercase_constants_are_free(tmp_path):
    with pytest.raises(ConfigError, match=r"cfg\.py:5: unknown key 'lr_schedular'; did you mean lr_scheduler\?"):
        load_text(tmp_path, TINY + "lr_schedular = dict(warmup_ratio=0.1)\n")
    cfg = load_text(tmp_path, TINY + "MY_FOLDER = '/data'\n_helper = 3\nimport os\n")
    assert cfg.constants == {"MY_FOLDER": "/data"}


@pytest.mark.parametrize("edit, message", [
    (("micro_num=2", "micro_num=0"), "data.micro_num must be a positive int, got 0"),
    (("micro_bsz=1", "micro_bsz='1'"), "data.micro_bsz must be a positive int, got '1'"),
    (('dtype="torch.float32"', 'dtype="torch.int8"'), "model.dtype must be one of 'torch.float16', 'torch.half', "),
    (("mlp_ratio=8 / 3,", "mlp_ratio=8 / 3, checkpoint=1.5,"),
     "model.checkpoint must be True, False or a number in [0, 1], got 1.5"),
    (("total_steps=10)", "total_steps=10, skip_batches='a-b')"), "data.skip_batches must be a string of inclusive"),
])
def test_wrong_type_or_range_is_a_clear_error(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=r"cfg\.py:\d+: " + re.escape(message)):
        load_text(tmp_path, TINY.replace(*edit))


def test_missing_required_key_says_where_to_add_it(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.total_steps is required: add total_steps=\.\.\. to data = dict"):
        load_text(tmp_path, TINY.replace(", total_steps=10", ""))


def test_config_must_be_a_python_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("data: {}")
    with pytest.raises(ConfigError, match=r"must be a Python file ending in \.py"):
        load_config(path)


def test_python_errors_in_the_config_report_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match=r"cfg\.py:2: syntax error"):
        load_text(tmp_path, "A = 1\nB = (\n")
    with pytest.raises(ConfigError, match=r"cfg\.py:3: the config raised NameError: name 'SEQLEN' is not defined"):
        load_text(tmp_path, "SEQ_LEN = 8\n\ndata = dict(seq_len=SEQLEN)\n")


def test_launch_normalisation(tmp_path, caplog):
    text = TINY.replace('dtype="torch.float32"', 'dtype="torch.tf32", checkpoint=True, rope_base=5000')
    text += ("parallel = dict(pipeline=2, tensor=dict(size=2))\n"
             "hybrid_zero_optimizer = dict(zero_overlap_communication=True)\n"
             "adam = dict(adam_beta2=0.99, adam_beta2_c=0.5)\n")
    cfg = load_text(tmp_path, text)
    assert cfg.model.dtype == torch.float32 and cfg.model.tf32 and cfg.model.checkpoint == 1.0
    assert cfg.model_dict["dtype"] == torch.float32 and cfg.model_dict["rope_base"] == 5000
    assert (cfg.parallel.pipeline.size, cfg.parallel.tensor.size) == (2, 2)
    assert cfg.data.packed_length == 16 and cfg.data.valid_micro_num == 2
    assert cfg.hybrid_zero_optimizer.overlap_sync_grad is True
    assert cfg.lr_scheduler.total_steps == 10
    assert (cfg.beta2_scheduler.init_beta2, cfg.beta2_scheduler.c) == (0.99, 0.5)

    with caplog.at_level(logging.WARNING, logger="evods.config"):
        cfg = load_text(tmp_path, TINY.replace('\n             dtype="torch.float32"', ""))
    assert cfg.model.dtype == torch.float16 and "model.dtype is not set" in caplog.text


def test_accepted_but_unapplied_keys_say_so(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="evods.config"):
        load_text(tmp_path, TINY.replace("total_steps=10)", "total_steps=10, seed=7, use_packed_dataset=False)"))
    assert "data.seed=7 is not applied by evods" in caplog.text
    assert "data.use_packed_dataset=False is not applied by evods" in caplog.text


@pytest.mark.parametrize("key, value, words", [
    ("skip_batches", "a-b", "a string of inclusive"), ("skip_batches", "9-3", "a string of inclusive"),
    ("skip_batches", "-1", "a string of inclusive"),
    ("rampup_batch_size", "1 x 2", 'a string "start increment every"'),
    ("rampup_batch_size", "3 1 1", 'a string "start increment every"'),  # starts above micro_num=2
])
def test_malformed_batch_schedules_name_file_and_key(tmp_path, key, value, words):
    with pytest.raises(ConfigError, match=rf"cfg\.py:1: data\.{key} must be {re.escape(words)}"):
        load_text(tmp_path, TINY.replace("total_steps=10)", f"total_steps=10, {key}={value!r})"))


def test_batch_schedules_are_parsed_once_with_the_config(tmp_path):
    data = load_text(tmp_path, TINY.replace("total_steps=10)", "total_steps=10, skip_batches='100-200, 350', "
                                                              "rampup_batch_size='1 1 4')")).data
    assert data.skip_ranges == ((100, 200), (350, 350)) and data.rampup == Rampup(start=1, increment=1, every=4)
    data = load_text(tmp_path, TINY).data
    assert data.skip_ranges == () and data.rampup is None


def test_checkpoint_saving_rules(tmp_path, caplog):
    with pytest.raises(ConfigError, match="ckpt.save_ckpt_folder is required when ckpt.enable_save_ckpt=True"):
        load_text(tmp_path, TINY + "ckpt = dict(checkpoint_every=5)\n")
    with caplog.at_level(logging.WARNING, logger="evods.config"):
        cfg = load_text(tmp_path, TINY + "ckpt = dict(save_ckpt_folder='local:ck', checkpoint_every=5, "
                                         "async_upload=True)\n")
    assert cfg.ckpt.async_upload is False and "only works for boto3:/s3:" in caplog.text
    assert cfg.ckpt.snapshot_ckpt_folder == "local:ck/snapshot" and cfg.ckpt.checkpoint_every == 5
    with pytest.raises(ConfigError, match=r"cfg\.py:\d+: ckpt\.snapshot_ckpt_folder='local:elsewhere': evods keeps "
                                          r"snapshots in local:ck/snapshot so that auto_resume finds them"):
        load_text(tmp_path, TINY + "ckpt = dict(save_ckpt_folder='local:ck', snapshot_ckpt_folder='local:elsewhere')\n")
    cfg = load_text(tmp_path, TINY + "ckpt = dict(save_ckpt_folder='boto3:s3://b/x', async_upload=True)\n")
    assert cfg.ckpt.async_upload is True and cfg.ckpt.async_upload_tmp_folder == "/dev/shm/internlm_tmp_ckpt/"


@pytest.mark.parametrize("heads, kv_heads, tensor, message", [
    (4, None, 3, r"cfg\.py:\d+: parallel\.tensor size 3 does not split model\.num_attention_heads=4 with "
                 r"num_kv_attention_heads=4: 4 query heads do not split into 3 equal parts \(sizes that fit: 1, 2, "
                 r"4\)"),
    (8, 3, 1, r"cfg\.py:\d+: model\.num_attention_heads=8 is not a multiple of model\.num_kv_attention_heads=3: each "
              r"KV head serves an equal group of query heads"),
    (12, 6, 4, r"parallel\.tensor size 4 does not split model\.num_attention_heads=12 with num_kv_attention_heads=6: 6 "
               r"KV heads do not fit 4 parts: each part needs whole KV heads of its own .* \(sizes that fit: 1, 2, 3, "
               r"6, 12\)"),
    (4, 1, 2, None),  # fewer KV heads than tensor ranks: each rank holds a copy of the one its query heads use
    (8, 2, 4, None),
    (8, 4, 2, None),  # each rank holds KV heads of its own
])
def test_attention_heads_must_split_over_the_tensor_size_at_load(tmp_path, heads, kv_heads, tensor, message):
    model = f"model = dict(num_attention_heads={heads}, num_kv_attention_heads={kv_heads}, hidden_size={8 * heads}, " \
            "num_layers=2, vocab_size=64, mlp_ratio=2, dtype='torch.float32')\n"
    text = TINY.split("model = dict")[0] + model + f"parallel = dict(tensor={tensor})\n" \
        "ckpt = dict(enable_save_ckpt=False)\n"
    if message is None:
        assert load_text(tmp_path, text).model.num_kv_attention_heads == kv_heads
        return
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text)
    assert re.search(message, str(caught.value)) and "\n" not in str(caught.value), str(caught.value)


@pytest.mark.parametrize("extra, world, message", [
    ("parallel = dict(pipeline=dict(size=3))\n", 3, r"model\.num_layers=2 is less than parallel\.pipeline size 3"),
    ("parallel = dict(tensor=2)\n", 3, r"3 processes cannot be split into pipeline 1 × tensor 2 groups"),
    ("parallel = dict(pipeline=2)\ndata = dict(seq_len=16, micro_num=1, micro_bsz=1, total_steps=10)\n", 2,
     r"data\.micro_num=1 is less than parallel\.pipeline size 2"),
    ("parallel = dict(tensor=4, sequence_parallel=True)\ndata = dict(seq_len=6, micro_num=2, micro_bsz=1, "
     "total_steps=10)\n", 4, r"cfg\.py:\d+: parallel\.sequence_parallel=True splits each micro-batch's "
                            r"data\.micro_bsz × data\.seq_len = 1 × 6 = 6 tokens over parallel\.tensor size 4"),
    ("parallel = dict(tensor=4, sequence_parallel=True)\ndata = dict(seq_len=6, micro_num=2, micro_bsz=2, "
     "total_steps=10, valid_every=5)\n", 4, r"each validation row's data\.seq_len=6 tokens over parallel\.tensor "
                                            r"size 4, which does not divide them"),
])
def test_topology_errors(tmp_path, extra, world, message):
    cfg = load_text(tmp_path, TINY + extra)
    with pytest.raises(ConfigError, match=message):
        check_topology(cfg, world)


def test_sequence_parallel_applies_with_tensor_parallelism_only(tmp_path, caplog):
    cfg = load_text(tmp_path, TINY + "parallel = dict(tensor=2, pipeline=2, sequence_parallel=True)\n")
    assert check_topology(cfg, 8) == ParallelLayout(dp=2, pp=2, tp=2, sequence_parallel=True)
    with caplog.at_level(logging.WARNING, logger="evods.config"):
        cfg = load_text(tmp_path, TINY + "parallel = dict(tensor=1, sequence_parallel=True)\n")
        assert check_topology(cfg, 2) == ParallelLayout(dp=2, pp=1, tp=1, sequence_parallel=False)
    assert "parallel.sequence_parallel=True has no effect with parallel.tensor size 1" in caplog.text
    # validation rows need a divisible seq_len only when validation runs
    cfg = load_text(tmp_path, TINY.replace("micro_bsz=1", "micro_bsz=2").replace("seq_len=16", "seq_len=6")
                    + "parallel = dict(tensor=4, sequence_parallel=True)\n")
    assert check_topology(cfg, 4).sequence_parallel


def test_interleaved_pipeline_is_refused(tmp_path):
    cfg = load_text(tmp_path, TINY.replace("mlp_ratio=8 / 3,", "mlp_ratio=8 / 3, num_chunks=2,"))
    with pytest.raises(ConfigError, match=r"model\.num_chunks=2 .* DeepSpeed pipelines run 1F1B only"):
        check_topology(cfg, 2)


def test_zero1_sizes_explain_what_deepspeed_does(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="evods.config"):
        check_topology(load_text(tmp_path, TINY + "parallel = dict(zero1=2)\n"), 4)
        assert "ZeRO-1 shards over the whole data-parallel group (4 ranks)" in caplog.text
        caplog.clear()
        check_topology(load_text(tmp_path, TINY + "parallel = dict(zero1=1)\n"), 4)
        assert "still uses ZeRO-1" in caplog.text and "wrong gradient norms" in caplog.text


def test_dtype_must_suit_the_device(tmp_path, monkeypatch):
    cfg = load_text(tmp_path, TINY.replace("torch.float32", "torch.float16"))
    monkeypatch.delenv(CPU_FP16_ENV, raising=False)
    with pytest.raises(ConfigError, match=r"torch\.float16 cannot train on the CPU; use \"torch\.bfloat16\""):
        check_device(cfg, "cpu", flash_attn_available=False)
    check_device(cfg, "cuda", flash_attn_available=False)
    monkeypatch.setenv(CPU_FP16_ENV, "1")
    check_device(cfg, "cpu", flash_attn_available=False)
    bf16 = load_text(tmp_path, TINY.replace("torch.float32", "torch.bfloat16"))
    check_device(bf16, "cpu", flash_attn_available=False)


def test_flash_attn_falls_back_with_one_warning(tmp_path, caplog):
    cfg = load_text(tmp_path, TINY)
    with caplog.at_level(logging.WARNING, logger="evods.config"):
        check_device(cfg, "cpu", flash_attn_available=False)
    assert cfg.model.use_flash_attn is False and cfg.model_dict["use_flash_attn"] is False
    assert [r.message.count("flash-attn is not installed") for r in caplog.records] == [1]


def test_without_flash_attn_cuda_keeps_the_fused_path_through_torch_varlen(tmp_path, caplog):
    cfg = load_text(tmp_path, TINY)
    with caplog.at_level(logging.INFO, logger="evods.config"):
        check_device(cfg, "cuda", flash_attn_available=False, torch_varlen_available=True)
    assert cfg.model.use_flash_attn is True and cfg.model_dict["use_flash_attn"] is True
    assert "torch's own varlen flash kernel" in caplog.text and "WARNING" not in caplog.text
    check_device(cfg, "cuda", flash_attn_available=False, torch_varlen_available=False)
    assert cfg.model.use_flash_attn is False


def test_alert_settings_are_checked_without_repeating_the_webhook(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="evods.config"):
        cfg = load_text(tmp_path, TINY + "monitor = dict(alert=dict(enable_feishu_alert=True))\n")
    assert "enable_feishu_alert=True but feishu_alert_address is None" in caplog.text
    assert (cfg.monitor.alert.webhook_format, cfg.monitor.alert.loss_spike_limit, cfg.monitor.alert.stuck_timeout,
            cfg.monitor.log_every) == ("feishu", 1.5, 1800, 50)
    with pytest.raises(ConfigError, match=r"cfg.py:\d+: monitor.alert.feishu_alert_address must be None or an "
                                          r"http:// or https:// URL$"):
        load_text(tmp_path, TINY + "monitor = dict(alert=dict(feishu_alert_address='open.feishu.cn/hook/s3cr3t'))\n")
    with pytest.raises(ConfigError, match="webhook_format must be one of 'feishu', 'slack'"):
        load_text(tmp_path, TINY + "monitor = dict(alert=dict(webhook_format='teams'))\n")
    legacy = load_text(tmp_path, TINY + "alert_address = 'https://open.feishu.cn/hook/legacy'\n")
    assert legacy.monitor.alert.feishu_alert_address == "https://open.feishu.cn/hook/legacy"
