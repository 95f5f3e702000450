"""Which checkpoint files a rank reads and which rank of a node downloads them (resume/rank_files.py), the
placeholders of files a node does not download, and the clean-up of scratch folders that crashed runs left on a
node's disk. The two-node runs that exercise all of it against real DeepSpeed loads are in test_multinode.py."""
import logging
import os
import subprocess

import pytest

from evods.checkpoint.errors import CheckpointError
from evods.checkpoint.resume.rank_files import (
    assign_downloads,
    deepspeed_files,
    model_files,
    own_deepspeed_files,
    run_state_files,
)
from evods.parallel import parallel_layout
from evods.storage import clean_scratch_leftovers, make_scratch_folder


def pipeline_checkpoint(dp: int, pp: int, tp: int, layers_per_stage: int) -> list[str]:
    """The file names DeepSpeed writes for a PipelineModule under ZeRO-1 (engine.py, pipe/module.py)."""
    names = [f"deepspeed/mp_rank_{m:02d}_model_states.pt" for m in range(pp * tp)]
    names += [f"deepspeed/layer_{i:02d}-model_{t:02d}-model_states.pt"
              for i in range(pp * layers_per_stage) for t in range(tp)]
    names += [f"deepspeed/zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt" for d in range(dp) for m in range(pp * tp)]
    return names + ["context.pt", "sampler.pt", "schedulers.pt", "topology.json", "config.json", "config_file.py",
                    "zero_to_fp32.py", *[f"rng/rank{r}.pt" for r in range(dp * pp * tp)]]


def test_a_pipeline_rank_reads_its_stage_its_tensor_slice_and_its_zero_partition():
    files = pipeline_checkpoint(dp=2, pp=2, tp=2, layers_per_stage=3)
    rank = 7  # dp 1, stage 1, tensor rank 1 in InternEvo's layout
    reads = own_deepspeed_files(files, parallel_layout(rank, 8, pp=2, tp=2), stage_layers=range(3, 6))
    assert reads == sorted([
        "deepspeed/mp_rank_03_model_states.pt",  # model-parallel rank = stage * tp + tensor rank
        "deepspeed/mp_rank_00_model_states.pt",  # DeepSpeed opens the first file of the list it globs, to count
        *[f"deepspeed/layer_{i:02d}-model_{t:02d}-model_states.pt" for i in (3, 4, 5) for t in (0, 1)],
        "deepspeed/zero_pp_rank_1_mp_rank_03_optim_states.pt",
    ])
    assert run_state_files(files, rank, frozenset({"model", "optimizer", "sampler"})) == [
        "context.pt", "rng/rank7.pt", "sampler.pt"]


def test_a_plain_rank_reads_its_tensor_module_and_bf16_partition():
    files = ["deepspeed/mp_rank_00_model_states.pt", "deepspeed/mp_rank_01_model_states.pt",
             *[f"deepspeed/bf16_zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt" for d in range(3) for t in range(2)]]
    reads = own_deepspeed_files(files, parallel_layout(5, 6, pp=1, tp=2), stage_layers=None)
    assert reads == ["deepspeed/bf16_zero_pp_rank_2_mp_rank_01_optim_states.pt",
                     "deepspeed/mp_rank_00_model_states.pt", "deepspeed/mp_rank_01_model_states.pt"]
    assert model_files(files) == ["deepspeed/mp_rank_00_model_states.pt", "deepspeed/mp_rank_01_model_states.pt"]
    assert model_files(pipeline_checkpoint(1, 2, 1, 2)) == [
        f"deepspeed/layer_{i:02d}-model_00-model_states.pt" for i in range(4)]
    assert deepspeed_files(["deepspeed/x.pt", "deepspeed/latest", "context.pt"]) == ["deepspeed/x.pt"]


def test_each_file_a_node_reads_is_downloaded_once_by_a_rank_that_reads_it():
    sizes = {"big": 100, "mid": 60, "small": 10, "common": 50, "tiny": 1}
    reads = {4: ["big", "common", "tiny"], 5: ["mid", "small", "common", "tiny"], 6: ["common"]}
    assigned = assign_downloads(reads, sizes)
    downloaded = [rel for rels in assigned.values() for rel in rels]
    assert sorted(downloaded) == sorted({rel for rels in reads.values() for rel in rels})  # each once
    assert all(set(assigned[rank]) <= set(reads[rank]) for rank in reads)  # only files the rank reads
    # largest first, each to the reader with the fewest bytes so far: the downloads spread over the node
    assert assigned == {4: ["big"], 5: ["mid", "small", "tiny"], 6: ["common"]}
    assert assign_downloads(dict(reversed(list(reads.items()))), sizes) == assigned, "every rank computes the same"


def test_the_checkpoint_engine_refuses_a_placeholder(tmp_path):
    from evods.checkpoint.deepspeed_io import VerifyingCheckpointEngine

    placeholder = tmp_path / "mp_rank_01_model_states.pt"
    placeholder.touch()
    with pytest.raises(CheckpointError, match="not downloaded to this node"):
        VerifyingCheckpointEngine().load(str(placeholder))


def test_scratch_folders_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead = tmp_path / f"evods-ckpt-40-rank3-pid{finished.pid}-a1b2"
    (dead / "deepspeed").mkdir(parents=True)
    (dead / "deepspeed" / "zero_pp_rank_3_mp_rank_00_optim_states.pt").write_bytes(b"partial")
    other_live = tmp_path / f"evods-load-pid{os.getppid()}-c3d4"  # another live process (another job, another rank)
    other_live.mkdir()
    own = make_scratch_folder("universal", str(tmp_path))
    unrelated = tmp_path / f"my-data-pid{finished.pid}-x"
    unrelated.mkdir()
    assert clean_scratch_leftovers(str(tmp_path)) == [str(dead)]
    assert not dead.exists() and other_live.is_dir() and os.path.isdir(own) and unrelated.is_dir()
    assert os.path.basename(own).startswith(f"evods-universal-pid{os.getpid()}-")
    assert clean_scratch_leftovers(str(tmp_path / "missing")) == []


def resume_after_damage_on_s3(folder: str, env: dict, run_root: str, damage) -> dict:
    os.environ.update(env)
    from evods.training.distributed import init_distributed
    from tests.checkpoint.test_resume import train

    init_distributed("torch")
    ckpt = dict(enable_save_ckpt=True, checkpoint_every=1, auto_resume=True, save_ckpt_folder=folder)
    train(1, 1, 2, ckpt, f"{run_root}/first")  # saves steps 1 and 2
    damage()
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("evods.checkpoint").addHandler(handler)
    resumed = train(1, 1, 3, ckpt, f"{run_root}/resumed")
    return {"loaded": resumed["loaded"][0], "warnings": warnings}


class FlipOneByte:
    """Changes one byte of an object in the bucket (same size): what a bad disk or a bad copy does."""

    def __init__(self, endpoint, key: str):
        self.url, self.bucket, self.key = endpoint.url, endpoint.bucket, key

    def __call__(self):
        from testkit.s3_server import s3_client

        client = s3_client(self.url)
        data = bytearray(client.get_object(Bucket=self.bucket, Key=self.key)["Body"].read())
        data[len(data) // 2] ^= 0xFF
        client.put_object(Bucket=self.bucket, Key=self.key, Body=bytes(data))


def test_a_file_damaged_on_s3_is_caught_on_download_and_the_previous_checkpoint_loads(s3_endpoint, tmp_path):
    from testkit.distributed import run_distributed
    from tests.checkpoint.test_resume import s3_env

    damage = FlipOneByte(s3_endpoint, "run/2/deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt")
    result = run_distributed(resume_after_damage_on_s3, 1, (s3_endpoint.path("run"), s3_env(), str(tmp_path),
                                                            damage))[0]
    assert result["loaded"] == "1"
    assert any("run/2 is damaged (deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt does not match its xxh3_64 "
               "checksum" in line and "loading the previous complete checkpoint" in line
               for line in result["warnings"]), result["warnings"]
