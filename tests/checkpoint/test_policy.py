"""When saves happen, which checkpoint auto_resume picks, and the load_ckpt_info errors (issue: checkpoints)."""
import json
import re

import pytest

from evods.checkpoint import CheckpointError, SavePolicy, StopFile, choose_load_plan, latest_checkpoint
from evods.checkpoint.formats.hf_start import HF_CKPT_TYPES
from evods.checkpoint.resume.plan import NATIVE_LAYOUTS
from evods.config import CKPT_TYPES, ConfigError, load_config
from evods.storage import LocalStorage
from testkit.train_configs import tiny_config
from tests.config.test_internevo import TINY


def decisions(policy: SavePolicy, steps) -> list:
    return [(step, d.folder, d.quit) for step in steps if (d := policy.decide(step)).folder is not None]


def test_every_n_steps_snapshots_alternate_from_slot_1_and_normal_saves_win(tmp_path):
    policy = SavePolicy(checkpoint_every=6, snapshot_freq=2, stop_file=StopFile(None))
    assert decisions(policy, range(1, 9)) == [(2, "snapshot/1", False), (4, "snapshot/0", False), (6, "6", False),
                                              (8, "snapshot/1", False)]


def test_stop_file_starts_at_0_and_asks_to_save_or_to_save_and_quit(tmp_path):
    path = tmp_path / "stop"
    policy = SavePolicy(checkpoint_every=float("inf"), snapshot_freq=float("inf"), stop_file=StopFile(str(path)))
    assert path.read_text() == "0"
    path.write_text("-2")
    assert decisions(policy, range(1, 4)) == [(2, "2", False)]
    path.write_text("5")
    assert decisions(policy, range(4, 7)) == [(5, "5", True)]
    path.write_text("not a number")
    assert decisions(policy, [7]) == []


def complete(storage: LocalStorage, folder: str, step: int) -> None:
    storage.write_bytes(f"{folder}/context.pt", b"")
    storage.write_bytes(f"{folder}/{step}.step", json.dumps({"step": step}).encode())


def test_latest_is_the_newest_marked_checkpoint_snapshots_included(tmp_path):
    storage = LocalStorage(tmp_path)
    assert latest_checkpoint(storage) is None
    complete(storage, "2", 2)
    storage.write_bytes("6/context.pt", b"")  # a save that never got its marker
    complete(storage, "snapshot/1", 3)
    assert latest_checkpoint(storage).folder == "snapshot/1"
    complete(storage, "snapshot/0", 4)
    assert (latest_checkpoint(storage).step, latest_checkpoint(storage).folder) == (4, "snapshot/0")
    complete(storage, "4", 4)
    assert latest_checkpoint(storage).folder == "4", "a normal checkpoint wins over a snapshot of the same step"


def ckpt_config(**keys):
    return tiny_config(ckpt=keys).ckpt


def test_auto_resume_overrides_load_ckpt_info_and_says_so(tmp_path):
    storage = LocalStorage(tmp_path / "save")
    info = dict(path=str(tmp_path / "hf"), content=("model",), ckpt_type="hf")
    ckpt = ckpt_config(save_ckpt_folder=f"local:{tmp_path}/save", load_ckpt_info=info, auto_resume=True)
    complete(storage, "8", 8)
    plan = choose_load_plan(ckpt, storage)
    assert (plan.folder, plan.ckpt_type, plan.content) == ("8", "evods", {"model", "sampler", "optimizer", "scheduler"})
    assert "step 8" in plan.reason and "load_ckpt_info" in plan.reason and "auto_resume=False" in plan.reason


@pytest.mark.parametrize("info, words", [
    (dict(content=("model", "optimizer"), ckpt_type="hf"), "holds model weights only"),
    (dict(content=("all",), ckpt_type="internlm"), "not an InternEvo native checkpoint"),
    (dict(content=("all",), ckpt_type="evods"), "not an evods checkpoint"),
])
def test_load_ckpt_info_mistakes_are_clear_errors(tmp_path, info, words):
    ckpt = ckpt_config(enable_save_ckpt=False, load_ckpt_info=dict(path=str(tmp_path), **info))
    with pytest.raises(CheckpointError, match=words):
        choose_load_plan(ckpt, None)


def test_a_ckpt_type_typo_is_refused_when_the_config_loads(tmp_path):
    """Before any process group starts (a 1000-rank job would otherwise start every rank to fail)."""
    (tmp_path / "cfg.py").write_text(TINY + f"ckpt = dict(load_ckpt_info=dict(path={str(tmp_path)!r}, "
                                            "content=('model',), ckpt_type='hf_lama'))\n")
    with pytest.raises(ConfigError) as refused:
        load_config(tmp_path / "cfg.py")
    assert re.fullmatch(r".*cfg\.py:\d+: ckpt\.load_ckpt_info\.ckpt_type must be one of 'evods', 'hf', 'hf_llama', "
                        r"'hf_model', 'internlm', 'internevo', 'internlm2_test', 'llama', got 'hf_lama'.*",
                        str(refused.value)), str(refused.value)


def test_every_ckpt_type_the_config_accepts_has_a_reader():
    assert set(CKPT_TYPES) == {"evods", *HF_CKPT_TYPES, *NATIVE_LAYOUTS}


def test_an_evods_checkpoint_without_marker_is_refused(tmp_path):
    LocalStorage(tmp_path).write_bytes("topology.json", b"{}")
    ckpt = ckpt_config(enable_save_ckpt=False, load_ckpt_info=dict(path=str(tmp_path), content="all",
                                                                   ckpt_type="evods"))
    with pytest.raises(CheckpointError, match="no {step}.step marker"):
        choose_load_plan(ckpt, None)
