"""InternEvo's current configs (its configs/*.py and configs/_base_/ inheritance) load, or are refused in one line that
names the key, the value and what evods runs instead."""
import logging
import re

import pytest
import torch

from evods.config import ConfigError, check_topology, load_config
from evods.model import Rope, config_from_model_dict
from testkit.internevo_configs import write_internevo_configs

TINY = """\
data = dict(seq_len=16, micro_num=2, micro_bsz=1, total_steps=10)
model = dict(num_attention_heads=4, hidden_size=32, num_layers=2, vocab_size=64, mlp_ratio=8 / 3,
             dtype="torch.float32")
ckpt = dict(enable_save_ckpt=False)
"""
NOT_BUILT = (r"is not a model evods builds: it builds 'INTERNLM', 'INTERNLM2', 'INTERNLM2_PUBLIC', 'INTERNLM3', "
             r"'LLAMA2' \(InternEvo's 'INTERNLM_MoE', .* are not ported\); use one it builds, with an InternLM-family "
             r"model dict")
# isp runs (Ulysses sequence parallelism); InternEvo's configs pair it with weight parallelism, which is refused


def weight_refusal(size: int) -> str:
    return (rf"parallel\.weight\.size={size} asks for InternEvo's weight parallelism \(an isp companion\), which evods "
            r"does not run; set weight=dict\(size=1\)")


@pytest.fixture(scope="module")
def internevo(tmp_path_factory):
    return write_internevo_configs(tmp_path_factory.mktemp("internevo"))


def refusal(path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("name, where, message", [
    ("7B_isp_sft.py", "7B_isp_sft.py", weight_refusal(4)),
    ("7B_MoE4_sft.py", "7B_MoE4_sft.py", "model_type='INTERNLM_MoE' " + NOT_BUILT),
    # InternEvo's InternLM2/3 configs all train with isp: every other key of theirs loads (the next test)
    ("7B_internlm2.py", "7B_internlm2.py", weight_refusal(2)),
    ("20B_internlm2.py", "20B_internlm2.py", weight_refusal(4)),
    ("8B_internlm3.py", "8B_internlm3.py", weight_refusal(16)),
])
def test_internevo_configs_evods_cannot_run_are_refused_in_one_line(internevo, name, where, message):
    line = refusal(internevo[name])
    assert re.fullmatch(re.escape(str(internevo[where])) + r":\d+: " + message, line), line


def test_internevo_llama2_config_loads_unmodified(internevo, caplog):
    """Llama-2-7B's shape with 8 KV heads (InternEvo's configs/7B_llama2.py trains with mtp), its model dict built."""
    with caplog.at_level(logging.WARNING, logger="evods.config"):
        cfg = load_config(internevo["7B_llama2.py"])
    hf = config_from_model_dict(cfg.model_dict)
    assert cfg.model_type == "LLAMA2" and cfg.model.dtype == torch.bfloat16
    assert (hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads,
            hf.intermediate_size, hf.vocab_size, hf.rope, hf.bias, hf.tie_word_embeddings) == \
        (32, 4096, 32, 8, 14336, 32000, Rope(10000.0), False, False)
    assert not caplog.records, caplog.text


def _with_mtp(internevo, name: str):
    """InternEvo's config `name` with Megatron tensor parallelism instead of isp (and its weight parallelism)."""
    text = internevo[name].read_text()
    text = re.sub(r'tensor=dict\(size=\d+, mode="isp"\)', 'tensor=dict(size=2, mode="mtp")', text)
    path = internevo[name].with_name(f"mtp_{name}")
    path.write_text(re.sub(r"weight=dict\(size=\d+", "weight=dict(size=1", text))
    return path


@pytest.mark.parametrize("name, model_type, sizes", [
    # (layers, hidden, heads, KV heads, intermediate, vocab, RoPE base): InternLM2-7B's MLP is 4096 * 3.5 = 14336
    ("7B_internlm2.py", "INTERNLM2_PUBLIC", (32, 4096, 32, 8, 14336, 92544, 10000.0)),
    ("20B_internlm2.py", "INTERNLM2", (48, 6144, 48, 8, 16384, 92544, 10000.0)),
    ("8B_internlm3.py", "INTERNLM3", (48, 4096, 32, 2, 10240, 128512, 5e7)),
])
def test_internevo_internlm2_and_3_configs_load_with_mtp(internevo, caplog, name, model_type, sizes):
    with caplog.at_level(logging.WARNING, logger="evods.config"):
        cfg = load_config(_with_mtp(internevo, name))
    assert cfg.model_type == model_type and cfg.generation["max_length"] == 100
    hf = config_from_model_dict(cfg.model_dict)
    assert (hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads,
            hf.intermediate_size, hf.vocab_size, hf.rope.base) == sizes
    assert hf.bias is False and cfg.loss.op_type == "py_vocab_parallel"
    if name == "20B_internlm2.py":  # a 4-stage 1F1B pipeline, recompute of half the layers
        assert (cfg.parallel.pipeline.size, cfg.parallel.pipeline.mode, cfg.model.checkpoint) == (4, "1f1b", 0.5)
        assert check_topology(cfg, 16).dp == 2
        assert "selective_checkpoint=True is not applied by evods" in caplog.text
    else:
        assert not caplog.records
    if name == "8B_internlm3.py":  # its split wq/wk/wv is a checkpoint layout, and an HF folder would start it
        assert cfg.raw_model["enable_qkv_fusion"] is False and cfg.ckpt.load_ckpt_info is None
        assert cfg.parallel.sequence_2D.enable is False and cfg.data.micro_num == 1


def test_internevo_7b_sft_loads_and_applies_its_keys(internevo, caplog):
    with caplog.at_level(logging.WARNING, logger="evods.config"):
        cfg = load_config(internevo["7B_sft.py"])
    assert not caplog.records  # every key of InternEvo's quickstart config is applied or silently a no-op
    parallel = cfg.parallel
    assert (parallel.zero1.size, parallel.zero1.fsdp) == (-1, False)
    assert (parallel.tensor.size, parallel.tensor.mode) == (1, "mtp")
    assert (parallel.pipeline.size, parallel.weight.size, parallel.sequence_parallel) == (1, 1, False)
    assert check_topology(cfg, 16).dp == 16
    assert cfg.use_fp32_norm is False and cfg.model.dtype == torch.bfloat16
    assert (cfg.data.micro_num, cfg.data.micro_bsz, cfg.data.gradient_accumulation) == (4, 2, 4)
    assert cfg.data.empty_cache_and_diag_interval == 200 and cfg.monitor.tensorboard.queue_max_length == 10
    assert cfg.ckpt.load_ckpt_info.ckpt_type == "internevo" and cfg.ckpt.load_ckpt_info.path == "local:llm_ckpts/xxxx"
    assert cfg.monitor.alert.alert_file_path == "llm_alter/7b_train_alert.log"
    hf = config_from_model_dict(cfg.model_dict)  # the model builder takes every model key (no 7B is built here)
    assert (hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers, hf.vocab_size) == (4096, 11008, 32, 103168)


def test_internevo_7b_isp_sft_runs_as_ulysses_without_weight_parallelism(internevo, caplog):
    """7B_isp_sft.py with weight=dict(size=1): isp of degree 2, each pair of ranks sharing rows
    (evods.parallel.ulysses), every other key as InternEvo's."""
    path = internevo["7B_isp_sft.py"].with_name("isp_weight1_7B_isp_sft.py")
    path.write_text(re.sub(r"weight=dict\(size=\d+", "weight=dict(size=1", internevo["7B_isp_sft.py"].read_text()))
    with caplog.at_level(logging.WARNING, logger="evods.config"):
        cfg = load_config(path)
    assert not caplog.records, caplog.text
    assert (cfg.parallel.tensor.size, cfg.parallel.tensor.mode, cfg.parallel.sequence_parallel) == (2, "isp", False)
    layout = check_topology(cfg, 16, rank=5)
    assert (layout.dp, layout.pp, layout.tp, layout.sp, layout.zero_ranks) == (8, 1, 1, 2, 16)
    assert (layout.dp_rank, layout.sp_rank, layout.zero_rank) == (2, 1, 5)


ISP_TINY = 'parallel = dict(tensor=dict(size=2, mode="isp"){})\n'


@pytest.mark.parametrize("extra, message", [
    (ISP_TINY.format(", sequence_2D=dict(enable=True, head_size=2, context_size=2)"),
     r"parallel\.sequence_2D\.context_size=2 \(InternEvo's ring-attention context parallelism\) is not run by evods; "
     r"set context_size=1"),
    (ISP_TINY.format(", sequence_2D=dict(enable=True, head_size=4, context_size=1)"),
     r"parallel\.sequence_2D\.head_size=4 must equal parallel\.tensor size 2"),
    (ISP_TINY.format(", zero=dict(stage=3)"), r'ZeRO-3 with parallel\.tensor\.mode="isp" is not run by evods'),
    ('parallel = dict(tensor=dict(size=3, mode="isp"))\n', r"parallel\.tensor size 3 does not split "
                                                          r"model\.num_attention_heads=4"),
])
def test_isp_combinations_evods_does_not_run_are_refused(tmp_path, extra, message):
    (tmp_path / "cfg.py").write_text(TINY + extra)
    assert re.search(r"cfg\.py:\d+: " + message, refusal(tmp_path / "cfg.py"))


def test_isp_with_head_size_loads(tmp_path):
    (tmp_path / "cfg.py").write_text(TINY + ISP_TINY.format(", sequence_2D=dict(enable=True, head_size=2, "
                                                            "context_size=1)"))
    assert check_topology(load_config(tmp_path / "cfg.py"), 4).sp == 2


def test_isp_with_a_pipeline_keeps_each_stages_isp_ranks_consecutive(tmp_path):
    (tmp_path / "cfg.py").write_text(TINY + ISP_TINY.format(", pipeline=2"))
    cfg = load_config(tmp_path / "cfg.py")
    placed = [check_topology(cfg, 8, rank) for rank in range(8)]
    assert [(at.dp_rank, at.pp_rank, at.sp_rank) for at in placed] == [
        (dp_rank, pp_rank, sp_rank) for dp_rank in range(2) for pp_rank in range(2) for sp_rank in range(2)]
    assert [at.zero_rank for at in placed] == [0, 1, 0, 1, 2, 3, 2, 3]


def _demo_on(internevo, base: str):
    """InternEvo's demo.py with another _base_ model, next to the real configs/ folder."""
    text = internevo["demo.py"].read_text().replace("models.internlm2_7B", f"models.{base}")
    path = internevo["demo.py"].with_name(f"demo_{base}.py")
    path.write_text(text)
    return path


def test_read_base_inheritance_without_internevo_installed(internevo):
    cfg = load_config(_demo_on(internevo, "internlm_7B"))
    # from _base_/default_runtime.py
    assert cfg.enable_tb and cfg.cudnn_deterministic is False and cfg.grad_scaler.fp16.initial_scale == 2**16
    # from _base_/models/internlm_7B.py
    assert cfg.model_type == "INTERNLM" and cfg.model.hidden_size == 4096 and cfg.parallel.zero1.size == 8
    # from demo.py itself, after the block: its own data, and load_ckpt_info with path=None trains from scratch
    assert cfg.JOB_NAME == "7b_train" and cfg.data.micro_bsz == 2 and cfg.data.valid_every == 50
    assert cfg.ckpt.load_ckpt_info is None and cfg.ckpt.auto_resume is False
    assert [base.path.name for base in cfg.source.bases] == ["default_runtime.py", "internlm_7B.py"]

    big = load_config(_demo_on(internevo, "internlm_20B"))
    assert (big.model.num_layers, big.parallel.tensor.size, big.parallel.tensor.mode) == (60, 4, "mtp")

    # the InternLM2 bases: 7B loads (its q/k rows interleaved: a checkpoint layout), 20B asks for fsp, 1B for norm_head
    v2 = load_config(internevo["demo.py"])
    assert (v2.model_type, v2.model.num_kv_attention_heads, v2.raw_model["qk_interleaved"]) == ("INTERNLM2_PUBLIC", 8,
                                                                                                  True)
    assert config_from_model_dict(v2.model_dict).intermediate_size == 14336
    line = refusal(_demo_on(internevo, "internlm2_20B"))
    assert re.match(re.escape(str(internevo["_base_/models/internlm2_20B.py"])) + r':\d+: parallel\.tensor\.mode="fsp"',
                    line), line
    line = refusal(_demo_on(internevo, "internlm2_1B"))
    assert re.fullmatch(re.escape(str(internevo["_base_/models/internlm2_1B.py"])) + r":\d+: model\.norm_head=True "
                        r"\(InternEvo's output head with L2-normalised rows\) is not supported by evods; set "
                        r"norm_head=False to train a plain output head", line), line
    # without norm_head the 1B builds, its MLP rounded to InternEvo's multiple_of=128: 2048 * 4 = 8192
    one_b = internevo["_base_/models/internlm2_1B.py"]
    one_b.with_name("internlm2_1B_plain.py").write_text(one_b.read_text().replace("norm_head=True", "norm_head=False"))
    plain = load_config(_demo_on(internevo, "internlm2_1B_plain"))
    assert config_from_model_dict(plain.model_dict).intermediate_size == 8192


def test_read_base_forms_and_mistakes(internevo):
    configs = internevo["demo.py"].parent
    relative = configs / "relative.py"
    relative.write_text("from mmengine.config import read_base\n"
                        "with read_base():\n    from ._base_.models.internlm_7B import model, parallel as _par\n"
                        + TINY.replace("model = dict", "_unused = dict") + "parallel = _par\n")
    cfg = load_config(relative)
    assert cfg.model.hidden_size == 4096 and cfg.parallel.zero1.size == 8

    missing = configs / "missing.py"
    missing.write_text("from internlm.utils.utils import read_base\nwith read_base():\n"
                       "    from configs._base_.models.internlm3_8B import *\n" + TINY)
    assert re.fullmatch(re.escape(f"{missing}:3: base config configs._base_.models.internlm3_8B not found: looked "
                                  "for configs/_base_/models/internlm3_8B.py in ") + r".* or copy the base's keys "
                                  r"into this file", refusal(missing))
    stray = configs / "stray.py"
    stray.write_text("from internlm.utils.utils import read_base\nwith read_base():\n    X = 1\n" + TINY)
    assert "stray.py:3: only `from ... import ...` lines may stand inside `with read_base():`" in refusal(stray)
    loop = configs / "_base_" / "loop.py"
    loop.write_text("with read_base():\n    from configs._base_.loop import *\n")
    assert "imports itself" in refusal(loop)


@pytest.mark.parametrize("extra, message", [
    ("parallel = dict(zero1=dict(size=-1, fsdp=True), pipeline=2)\n",
     r"cfg\.py:5: parallel\.zero1\.fsdp=True \(ZeRO-3\) cannot run with parallel\.pipeline size 2"),
    ('parallel = dict(tensor=dict(size=2, mode="fsp"))\n',
     r'cfg\.py:5: parallel\.tensor\.mode="fsp" .* use mode="mtp"'),
    ('parallel = dict(tensor=dict(size=2, mode="tp"))\n',
     r"cfg\.py:5: parallel\.tensor\.mode must be one of 'mtp', 'msp', 'fsp', 'isp', got 'tp'"),
    ("parallel = dict(weight=dict(size=2, overlap=True, memory_pool=True))\n",
     r"cfg\.py:5: parallel\.weight\.size=2 asks for InternEvo's weight parallelism .* set weight=dict\(size=1\)"),
    ("use_fp32_norm = True\n", r"cfg\.py:5: use_fp32_norm=True \(fp32 norm weights in a 16-bit model\) is not "
                               r"supported by evods"),
    ('model_type = "QWEN2"\n', r"cfg\.py:5: model_type='QWEN2' " + NOT_BUILT),
    ('parallel = dict(pipeline=dict(size=2, mode="zbv"))\n',
     r"cfg\.py:5: parallel\.pipeline\.mode='zbv' \(InternEvo's zero-bubble schedule\) is not run by evods: "
     r'DeepSpeed\'s pipeline engine runs 1F1B; set mode="1f1b"'),
    ("parallel = dict(sequence_2D=dict(enable=True, head_size=2, context_size=1))\n",
     r"cfg\.py:5: parallel\.sequence_2D\.enable=True \(InternEvo's head x context sequence parallelism, an isp "
     r"companion\) is not run by evods; set enable=False"),
])
def test_internevo_parallel_modes_evods_does_not_run_are_refused(tmp_path, extra, message):
    text = TINY.replace('dtype="torch.float32"', 'dtype="torch.bfloat16"') + extra
    (tmp_path / "cfg.py").write_text(text)
    assert re.search(message, refusal(tmp_path / "cfg.py"))


def test_internevo_key_forms_that_load(tmp_path, caplog):
    path = tmp_path / "cfg.py"
    path.write_text(TINY + "use_fp32_norm = True\nmetric_dtype = 'fp32'\n"  # fp32 norms in an fp32 model: a no-op
                    "parallel = dict(zero1=8, tensor=dict(size=2, mode=None), pipeline=2, weight=dict(size=1))\n")
    cfg = load_config(path)
    assert (cfg.parallel.zero1.size, cfg.parallel.tensor.mode, cfg.parallel.pipeline.size) == (8, "mtp", 2)
    assert cfg.data.gradient_accumulation == 2

    path.write_text(TINY.replace("total_steps=10", "total_steps=10, gradient_accumulation=4"))
    assert re.search(r"cfg\.py:1: data\.gradient_accumulation=4 must equal data\.micro_num=2", refusal(path))
    with caplog.at_level(logging.WARNING, logger="evods.config"):
        path.write_text(TINY + "moe = dict(top_k=2)\nmetric_dtype = 'bf16'\n")
        load_config(path)
    assert "moe=dict(...) is not applied by evods: model_type 'INTERNLM' has no experts" in caplog.text
    assert "metric_dtype='bf16' is not applied by evods: metrics are always computed in fp32" in caplog.text


@pytest.mark.parametrize("parallel, applied", [
    ('dict(tensor=dict(size=2, mode="msp"))', True),  # InternEvo's Megatron tensor + sequence parallelism
    ('dict(tensor=dict(size=2, mode="mtp"), sequence_parallel=True)', True),  # the quickstart's key is honoured
    ('dict(tensor=dict(size=2, mode="mtp"))', False),
    ('dict(tensor=dict(size=1, mode="msp"))', False),  # nothing to split the tokens over: a warning, as InternEvo
])
def test_tensor_mode_msp_is_sequence_parallelism(tmp_path, parallel, applied):
    (tmp_path / "cfg.py").write_text(TINY + f"parallel = {parallel}\n")
    cfg = load_config(tmp_path / "cfg.py")
    assert check_topology(cfg, 2).sequence_parallel is applied
