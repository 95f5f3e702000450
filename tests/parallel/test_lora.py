"""LoRA on a frozen base: the same training at every parallel layout as one process, the same logits and gradients as
peft's LoRA on the plain model, and the config's one-line refusals (issue: LoRA with tensor and pipeline parallelism).

Two launches cover the layouts (one of 2 ranks trains three of them in turn, one of 4 ranks the fourth), so the suite
pays the process start-up twice. The adapters start with B random (init_lora_weights=False, peft's option for tests),
so the low-rank terms change the losses from the first step on.
"""
import hashlib
import math
import os
from pathlib import Path

import pytest
import torch

from evods.config import ConfigError
from testkit.distributed import run_distributed
from testkit.train_configs import tiny_config

STEPS = 3
ROWS_PER_STEP = 4  # packed rows per optimizer step, summed over data-parallel ranks
LORA = dict(r=4, alpha=8, dropout=0.0, init_lora_weights=False)  # the short spellings of lora_alpha, lora_dropout
# name: (tp, pp, dp, sequence parallel, recompute, KV heads); recompute and sequence parallelism change nothing
# either; one KV head under tp=2 puts a copy of it (and of its adapter's B rows) on both tensor ranks
LAYOUTS = {
    "one_process": (1, 1, 1, False, False, None),
    "one_process_kv1": (1, 1, 1, False, False, 1),
    "tp2": (2, 1, 1, False, True, None),
    "pp2": (1, 2, 1, False, False, None),
    "dp2": (1, 1, 2, False, False, None),
    "tp2_kv1": (2, 1, 1, False, False, 1),
    "tp2_pp2_sp": (2, 2, 1, True, False, None),
}


def train_lora(layouts: list[str], run_root: str) -> dict:
    import torch.distributed as dist

    from evods.model.lora import is_lora_parameter
    from evods.training.distributed import init_distributed
    from evods.training.trainer import Trainer

    init_distributed("torch")
    results = {}
    for name in layouts:
        tp, pp, dp, sequence_parallel, recompute, kv_heads = LAYOUTS[name]
        cfg = tiny_config(
            data=dict(seq_len=32, micro_bsz=2, micro_num=ROWS_PER_STEP // dp, total_steps=STEPS),
            model=dict(dtype="torch.float32", checkpoint=recompute, num_kv_attention_heads=kv_heads),
            parallel=dict(pipeline=dict(size=pp), zero1=-1, tensor=dict(size=tp), sequence_parallel=sequence_parallel),
            lr_scheduler=dict(total_steps=STEPS, warmup_ratio=0.0),
            lora=LORA,
        )
        trainer = Trainer(cfg, run_dir=Path(run_root) / name)
        module = trainer.engine.engine.module
        frozen = {key: param.detach().clone() for key, param in module.named_parameters() if not param.requires_grad}
        adapters = [param for key, param in module.named_parameters() if param.requires_grad]
        assert all(is_lora_parameter(key) for key, param in module.named_parameters() if param.requires_grad)
        assert frozen and adapters, name
        state = trainer.train()
        # Adam's two moments over this rank's share of the adapters: ZeRO-1 flattens and partitions them
        moments = sum(value.numel() for param_state in trainer.engine.optimizer.optimizer.state.values()
                      for key, value in param_state.items() if key in ("exp_avg", "exp_avg_sq"))
        changed = [key for key, param in module.named_parameters() if key in frozen
                   and not torch.equal(param.detach(), frozen[key])]
        results[name] = {"steps": [(entry["loss"], entry["grad_norm"]) for entry in state.history],
                         "base_changed": changed, "moments": moments, "dp": dp,
                         "adapter_tensors": len(adapters), "adapter_elements": sum(p.numel() for p in adapters)}
    return {"rank": dist.get_rank(), "results": results}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run_distributed(train_lora, world=1, args=(["one_process", "one_process_kv1"],
                                                      str(tmp_path_factory.mktemp("ref"))))[0]["results"]


def assert_same_training(reference: dict, result: dict, where: str) -> None:
    assert result["base_changed"] == [], (where, "frozen base weights changed", result["base_changed"][:3])
    assert len(result["steps"]) == STEPS, where
    for step, ((ref_loss, ref_norm), (loss, norm)) in enumerate(zip(reference["steps"], result["steps"])):
        assert math.isclose(loss, ref_loss, rel_tol=1e-5), (where, step, loss, ref_loss)
        assert math.isclose(norm, ref_norm, rel_tol=1e-5), (where, step, norm, ref_norm)


def test_one_process_trains_the_adapters_only(reference):
    assert reference["one_process"]["steps"] != reference["one_process_kv1"]["steps"], "KV heads make another model"
    reference = reference["one_process"]
    assert reference["base_changed"] == []
    losses = [loss for loss, _ in reference["steps"]]
    assert len(set(losses)) == STEPS and losses[-1] < losses[0], "the adapters learn"
    assert reference["adapter_tensors"] == 4 * 7 * 2, "every projection of the 4 layers has A and B"
    assert reference["moments"] == 2 * reference["adapter_elements"], "the optimizer holds the adapters only"


@pytest.mark.parametrize("world, layouts", [(2, ["tp2", "pp2", "dp2", "tp2_kv1"]), (4, ["tp2_pp2_sp"])],
                         ids=["tp2-pp2-dp2-tp2kv1", "tp2xpp2-sp"])
def test_parallel_lora_matches_one_process(world, layouts, reference, tmp_path):
    ranks = run_distributed(train_lora, world=world, args=(layouts, str(tmp_path)))
    for rank in ranks:
        for name in layouts:
            result = rank["results"][name]
            one_process = reference["one_process_kv1" if LAYOUTS[name][5] == 1 else "one_process"]
            assert_same_training(one_process, result, f"rank {rank['rank']} {name}")
            # ZeRO-1 splits the adapters' optimizer states over the data-parallel ranks (up to its alignment)
            assert result["moments"] <= 2 * math.ceil(result["adapter_elements"] / result["dp"]) + 64, name


# ------------------------------------------------------------------------------------- peft on the plain model

def test_adapters_give_peft_logits_and_gradients():
    import peft

    from evods.model import InternLMConfig, InternLMForCausalLM
    from evods.model.lora import LoraSpec, add_lora

    torch.manual_seed(0)
    config = InternLMConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, bias=True, dtype=torch.float32)
    plain = InternLMForCausalLM(config).eval()
    ours = InternLMForCausalLM(config).eval()
    ours.load_state_dict(plain.state_dict())
    spec = LoraSpec(r=4, lora_alpha=16, use_rslora=True, init_lora_weights=False)
    add_lora(ours, spec)
    theirs = peft.get_peft_model(plain, peft.LoraConfig(r=spec.r, lora_alpha=spec.lora_alpha,
                                                        target_modules=list(spec.target_modules),
                                                        use_rslora=True, init_lora_weights=False))
    adapters = {name: param for name, param in ours.named_parameters() if param.requires_grad}
    peft_adapters = {name.removeprefix("base_model.model.").replace(".default.", "."): param
                     for name, param in theirs.named_parameters() if param.requires_grad}
    assert set(adapters) == set(peft_adapters) and len(adapters) == 2 * 7 * 2
    with torch.no_grad():
        for name, param in peft_adapters.items():
            param.copy_(adapters[name])
    assert all(adapters[name].abs().sum() > 0 for name in adapters if "lora_B" in name), "B is not zero"

    input_ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    logits = ours(input_ids=input_ids).logits
    peft_logits = theirs(input_ids=input_ids).logits
    torch.testing.assert_close(logits, peft_logits, rtol=1e-5, atol=1e-6)
    (logits.float().logsumexp(-1).mean()).backward()
    (peft_logits.float().logsumexp(-1).mean()).backward()
    for name, param in adapters.items():
        torch.testing.assert_close(param.grad, peft_adapters[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    assert all(param.grad is None for name, param in ours.named_parameters() if name not in adapters), "base frozen"


# ------------------------------------------------------------------------------------- the config

@pytest.mark.parametrize("lora, parallel, message", [
    (dict(target_modules=["q_proj", "wqkv"]), {}, r"lora\.target_modules must be a list of the names q_proj, "),
    (dict(r=0), {}, r"lora\.r must be a positive int, got 0"),
    (dict(load_in_4bit=True), {}, r"lora\.load_in_4bit=True \(QLoRA: a 4-bit base\) is not run by evods"),
    (dict(r=8), dict(zero=dict(stage=3)), r"lora=dict\(\.\.\.\) with ZeRO-3 is not supported"),
])
def test_lora_config_refusals_are_one_line(lora, parallel, message):
    with pytest.raises(ConfigError, match=message) as error:
        tiny_config(lora=lora, parallel=parallel)
    assert "\n" not in str(error.value)


def test_lora_config_takes_peft_names_and_short_ones():
    long = tiny_config(lora=dict(r=16, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])).lora
    short = tiny_config(lora=dict(r=16, alpha=32, dropout=0.1, target_modules=["q_proj", "v_proj"])).lora
    assert long == short and long.spec().scaling == 2.0 and long.spec().target_modules == ("q_proj", "v_proj")
    assert tiny_config().lora is None


# ------------------------------------------------------------------------------------- checkpoints

TOTAL_STEPS, SAVE_EVERY = 4, 2


def lora_run(total_steps: int, ckpt: dict, run_dir: str) -> dict:
    from evods.training.trainer import Trainer

    cfg = tiny_config(data=dict(seq_len=32, micro_bsz=2, micro_num=ROWS_PER_STEP, total_steps=total_steps),
                      model=dict(dtype="torch.float32"), parallel=dict(zero1=-1, tensor=dict(size=2)),
                      lr_scheduler=dict(total_steps=TOTAL_STEPS, warmup_ratio=0.25), ckpt=ckpt, lora=LORA)
    trainer = Trainer(cfg, run_dir=Path(run_dir))
    base = {key: hashlib.sha256(param.detach().numpy().tobytes()).hexdigest()  # (tensors do not cross processes)
            for key, param in trainer.engine.engine.module.named_parameters() if not param.requires_grad}
    state = trainer.train()
    trainer.close()
    loaded = trainer.checkpoints.loader.loaded
    return {"losses": [entry["loss"] for entry in state.history], "loaded": loaded and loaded.folder,
            "base": base}


def resume_launch(ckpt: dict, run_root: str, first: bool) -> dict:
    from evods.training.distributed import init_distributed

    init_distributed("torch")
    if not first:
        return {"resumed": lora_run(TOTAL_STEPS, ckpt, f"{run_root}/resumed")}
    return {"reference": lora_run(TOTAL_STEPS, {**ckpt, "enable_save_ckpt": False}, f"{run_root}/reference"),
            "interrupted": lora_run(SAVE_EVERY, ckpt, f"{run_root}/interrupted")}


def test_lora_checkpoint_holds_adapters_and_resumes_exactly(tmp_path):
    """tp=2: the base from an HF folder, adapters + their Adam state saved at step 2, a fresh launch resumes."""
    from evods.training.trainer import build_model

    base_folder = tmp_path / "base"
    torch.manual_seed(7)  # another base than the seeded build's, so that a base not loaded would show
    build_model(tiny_config(model=dict(dtype="torch.float32"))).save_pretrained(base_folder)
    ckpt = dict(enable_save_ckpt=True, checkpoint_every=SAVE_EVERY, auto_resume=True,
                save_ckpt_folder=f"local:{tmp_path}/ckpt",
                load_ckpt_info=dict(path=str(base_folder), content=("model",), ckpt_type="hf"))
    first = run_distributed(resume_launch, 2, (ckpt, str(tmp_path), True))
    second = run_distributed(resume_launch, 2, (ckpt, str(tmp_path), False))
    for rank_first, rank_second in zip(first, second):
        reference, interrupted, resumed = rank_first["reference"], rank_first["interrupted"], rank_second["resumed"]
        assert interrupted["losses"] == reference["losses"][:SAVE_EVERY]
        assert resumed["loaded"] == str(SAVE_EVERY)
        assert resumed["losses"] == reference["losses"][SAVE_EVERY:], "bitwise: adapters, Adam state, schedules"
        assert resumed["base"] == reference["base"], "the resumed run's base is the HF folder's again"
    saved = torch.load(tmp_path / "ckpt" / str(SAVE_EVERY) / "deepspeed" / "mp_rank_01_model_states.pt",
                       weights_only=False)["module"]
    assert saved and all(".lora_A." in key or ".lora_B." in key for key in saved), "adapters only"
    assert any(name.endswith(".step") for name in os.listdir(tmp_path / "ckpt" / str(SAVE_EVERY))), "the marker"
    check_exports(tmp_path / "ckpt" / str(SAVE_EVERY), base_folder, tmp_path)


def check_exports(checkpoint: Path, base_folder: Path, tmp_path: Path) -> None:
    """The tp=2 LoRA checkpoint exported as base + peft adapter folder, and merged in every format."""
    import peft
    from transformers import AutoModelForCausalLM

    from evods.checkpoint import CheckpointError
    from evods.checkpoint.formats.checkpoint_model import read_checkpoint_model
    from evods.checkpoint.formats.hf import export_hf
    from evods.checkpoint.formats.internevo_export import export_native

    with pytest.raises(CheckpointError, match=r"holds LoRA adapters only: give --base"):
        export_hf(str(checkpoint), str(tmp_path / "no_base"))
    export_hf(str(checkpoint), str(tmp_path / "with_adapter"), base=str(base_folder))
    for fmt in ("internlm", "llama", "internlm2"):
        export_hf(str(checkpoint), str(tmp_path / f"merged_{fmt}"), fmt=fmt, base=str(base_folder), merge=True)
    export_native(str(checkpoint), str(tmp_path / "merged_native"), tp=2, base=str(base_folder))

    input_ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(3))
    exported_base = AutoModelForCausalLM.from_pretrained(tmp_path / "with_adapter").eval()
    base_logits = exported_base(input_ids=input_ids).logits
    original = AutoModelForCausalLM.from_pretrained(base_folder).eval()
    torch.testing.assert_close(original(input_ids=input_ids).logits, base_logits, rtol=0, atol=0)
    with_adapter = peft.PeftModel.from_pretrained(exported_base, tmp_path / "with_adapter" / "adapter").eval()
    logits = with_adapter(input_ids=input_ids).logits
    assert (logits - base_logits).abs().max() > 1e-3, "the adapters change the model"
    for fmt in ("internlm", "llama", "internlm2"):
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / f"merged_{fmt}", trust_remote_code=True).eval()
        torch.testing.assert_close(merged(input_ids=input_ids).logits, logits, rtol=1e-5, atol=1e-5, msg=fmt)
    native = read_checkpoint_model(str(tmp_path / "merged_native"))[1]
    hf_merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged_internlm").state_dict()
    assert native and all(torch.equal(native[name], hf_merged[name]) for name in native), "native = merged HF"
