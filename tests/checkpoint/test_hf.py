"""evods checkpoints to HF folders (InternLM with remote code, stock Llama) and HF folders back into training
(issue: checkpoints)."""
from pathlib import Path

import pytest
import torch

from testkit.distributed import run_distributed
from testkit.train_configs import tiny_config
from tools.convert2hf import main as convert2hf


def config(pipeline: int, total_steps: int, ckpt: dict):
    return tiny_config(data=dict(seq_len=32, micro_bsz=2, micro_num=2, total_steps=total_steps),
                       model=dict(dtype="torch.float32"), parallel=dict(pipeline=dict(size=pipeline), zero1=-1),
                       lr_scheduler=dict(total_steps=4, warmup_ratio=0.25),
                       ckpt=dict(enable_save_ckpt=True, checkpoint_every=total_steps, auto_resume=False, **ckpt))


def train_pipelined(save_folder: str, run_dir: str) -> None:
    from evods.training.distributed import init_distributed
    from evods.training.trainer import Trainer

    init_distributed("torch")
    Trainer(config(2, 2, dict(save_ckpt_folder=save_folder)), run_dir=Path(run_dir)).train()


def train_from_hf(hf_folder: str, save_folder: str, run_dir: str) -> dict:
    from evods.training.distributed import init_distributed
    from evods.training.trainer import Trainer

    init_distributed("torch")
    ckpt = dict(save_ckpt_folder=save_folder, load_ckpt_info=dict(path=hf_folder, content=("model",), ckpt_type="hf"))
    trainer = Trainer(config(1, 1, ckpt), run_dir=Path(run_dir))
    # numpy arrays travel by value; tensors would travel as shared memory that dies with this process
    start = {name: tensor.numpy().copy() for name, tensor in trainer.engine.engine.module.state_dict().items()}
    trainer.train()
    return start


def logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits


@pytest.fixture(scope="module")
def pipelined_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pp2")
    run_distributed(train_pipelined, 2, (f"local:{root}/ckpt", str(root / "run")))
    return root / "ckpt" / "2"


def test_a_pipelined_checkpoint_exports_to_internlm_and_llama_with_equal_logits(pipelined_checkpoint, tmp_path,
                                                                                tokenizer_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    import evods.model  # noqa: F401 - registers InternLM with the Auto classes
    from evods.checkpoint import deepspeed_weights
    from evods.model import InternLMConfig, InternLMForCausalLM

    assert convert2hf(["--src", str(pipelined_checkpoint), "--tgt", str(tmp_path / "internlm"),
                       "--tokenizer", str(tokenizer_path)]) == 0
    assert convert2hf(["--src", f"local:{pipelined_checkpoint}", "--tgt", str(tmp_path / "llama"),
                       "--format", "llama"]) == 0
    trained = InternLMForCausalLM(InternLMConfig.from_pretrained(pipelined_checkpoint))
    trained.load_state_dict(deepspeed_weights(str(pipelined_checkpoint)))
    internlm = AutoModelForCausalLM.from_pretrained(tmp_path / "internlm")
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama")
    assert type(internlm) is InternLMForCausalLM and llama.config.attention_bias
    # exported as InternLM's HF models are: dynamic NTK RoPE beyond max_position_embeddings
    assert internlm.config.rotary["type"] == "dynamic" and llama.config.rope_parameters["rope_type"] == "dynamic"
    # the length of the rows it trained on (seq_len 32 × micro_bsz 2), which the inference tools state
    assert internlm.config.training_packed_length == 64
    assert {"configuration_internlm.py", "modeling_internlm.py", "generation_config.json", "tokenizer.model"} <= \
        {p.name for p in (tmp_path / "internlm").iterdir()}
    input_ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = logits(trained, input_ids)
    assert torch.equal(logits(internlm, input_ids), expected)
    torch.testing.assert_close(logits(llama, input_ids), expected, rtol=1e-5, atol=1e-5)

    import sentencepiece

    text = "checkpoints round trip"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "internlm")
    assert tokenizer(text)["input_ids"] == [1] + sentencepiece.SentencePieceProcessor(
        model_file=str(tokenizer_path)).encode(text)


def test_training_starts_from_an_hf_llama_folder_and_its_checkpoint_exports_again(pipelined_checkpoint, tmp_path):
    from evods.checkpoint import hf_weights

    assert convert2hf(["--src", str(pipelined_checkpoint), "--tgt", str(tmp_path / "llama"), "--format", "llama"]) == 0
    start = run_distributed(train_from_hf, 1, (str(tmp_path / "llama"), f"local:{tmp_path}/ckpt",
                                               str(tmp_path / "run")))[0]
    exported = hf_weights(str(tmp_path / "llama"))
    assert start.keys() == exported.keys()
    assert all(torch.equal(torch.from_numpy(start[name]), exported[name]) for name in start)
    # the one-stage checkpoint of that run (DeepSpeed's module file) exports too
    assert convert2hf(["--src", str(tmp_path / "ckpt" / "1"), "--tgt", str(tmp_path / "again")]) == 0
    again = hf_weights(str(tmp_path / "again"))
    assert again.keys() == exported.keys() and any(not torch.equal(again[n], exported[n]) for n in again), \
        "one training step moved the weights"


def test_converting_an_incomplete_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "5").mkdir()
    assert convert2hf(["--src", str(tmp_path / "5"), "--tgt", str(tmp_path / "out")]) == 1
    assert "not a complete evods checkpoint" in capsys.readouterr().err
