"""k steps, a restart in a fresh process, then N-k steps train exactly like N uninterrupted steps (issue: checkpoints).

Per topology two launches: the first trains the uninterrupted reference and then a run that saves and stops at step
K; the second (a fresh process) auto-resumes from the save folder and finishes. One process uses S3 with background
uploads, ZeRO-1 over two data-parallel ranks uses S3 synchronously (each rank uploads its own DeepSpeed files), the
pipeline uses a local folder.
"""
import json
import os
from pathlib import Path

from testkit.distributed import run_distributed
from testkit.train_configs import tiny_config

TOTAL_STEPS, SAVE_EVERY = 4, 2
ROWS_PER_STEP = 4


def checkpointed_config(pipeline: int, data_parallel: int, total_steps: int, ckpt: dict, tensor: int | dict = 1):
    return tiny_config(
        data=dict(seq_len=32, micro_bsz=2, micro_num=ROWS_PER_STEP // data_parallel, total_steps=total_steps),
        model=dict(dtype="torch.float32"),
        parallel=dict(pipeline=dict(size=pipeline), zero1=-1, tensor=tensor),
        lr_scheduler=dict(total_steps=TOTAL_STEPS, warmup_ratio=0.25),  # the schedule of the whole run
        ckpt=ckpt,
    )


def train(pipeline: int, data_parallel: int, total_steps: int, ckpt: dict, run_dir: str,
          tensor: int | dict = 1) -> dict:
    from evods.training.trainer import Trainer

    trainer = Trainer(checkpointed_config(pipeline, data_parallel, total_steps, ckpt, tensor), run_dir=Path(run_dir))
    state = trainer.train()
    trainer.close()
    loaded = trainer.checkpoints.loader.loaded
    return {"losses": [entry["loss"] for entry in state.history], "step_count": state.step_count,
            "batch_count": state.batch_count, "loaded": loaded and (loaded.folder, loaded.reason)}


def first_launch(pipeline, data_parallel, ckpt, env, run_root, tensor=1) -> dict:
    """The uninterrupted reference, then a run that saves every SAVE_EVERY steps and ends at SAVE_EVERY."""
    os.environ.update(env)
    from evods.training.distributed import init_distributed

    init_distributed("torch")
    reference = train(pipeline, data_parallel, TOTAL_STEPS, dict(enable_save_ckpt=False), f"{run_root}/reference",
                      tensor)
    interrupted = train(pipeline, data_parallel, SAVE_EVERY, ckpt, f"{run_root}/interrupted", tensor)
    return {"reference": reference, "interrupted": interrupted}


def second_launch(pipeline, data_parallel, ckpt, env, run_root, tensor=1) -> dict:
    os.environ.update(env)
    from evods.training.distributed import init_distributed

    init_distributed("torch")
    return train(pipeline, data_parallel, TOTAL_STEPS, ckpt, f"{run_root}/resumed", tensor)


def check_exact_resume(pipeline: int, data_parallel: int, ckpt: dict, env: dict, run_root: Path) -> dict:
    ckpt = dict(enable_save_ckpt=True, checkpoint_every=SAVE_EVERY, auto_resume=True, **ckpt)
    world = pipeline * data_parallel
    first = run_distributed(first_launch, world, (pipeline, data_parallel, ckpt, env, str(run_root)))
    second = run_distributed(second_launch, world, (pipeline, data_parallel, ckpt, env, str(run_root)))
    for rank_first, resumed in zip(first, second):
        reference, interrupted = rank_first["reference"], rank_first["interrupted"]
        assert interrupted["loaded"] is None, "the first run starts fresh: the save folder is empty"
        assert interrupted["losses"] == reference["losses"][:SAVE_EVERY]
        assert resumed["loaded"][0] == str(SAVE_EVERY)
        assert "auto_resume" in resumed["loaded"][1]
        # bitwise: same data order, same weights, same Adam state, same schedules
        assert resumed["losses"] == reference["losses"][SAVE_EVERY:]
        assert (resumed["step_count"], resumed["batch_count"]) == (TOTAL_STEPS, reference["batch_count"])
    assert len(set(first[0]["reference"]["losses"])) == TOTAL_STEPS, "training moves"
    return first[0]


def s3_env() -> dict:
    """The credentials the s3_endpoint fixture set, for the worker processes (which keep their own environment)."""
    return {"S3_ACCESS_KEY_ID": os.environ["S3_ACCESS_KEY_ID"],
            "S3_SECRET_ACCESS_KEY_ID": os.environ["S3_SECRET_ACCESS_KEY_ID"]}


def test_one_process_resumes_exactly_from_s3_with_background_uploads(s3_endpoint, tmp_path):
    ckpt = dict(save_ckpt_folder=s3_endpoint.path("run"), async_upload=True,
                async_upload_tmp_folder=str(tmp_path / "upload_tmp"), keep_last_ckpts=1)
    check_exact_resume(1, 1, ckpt, s3_env(), tmp_path)
    listing = s3_endpoint.client().list_objects_v2(Bucket=s3_endpoint.bucket, Prefix="run/")
    keys = {entry["Key"] for entry in listing["Contents"]}
    # keep_last_ckpts=1: the resumed run's step-4 checkpoint replaced step 2; its marker came after its uploads
    assert "run/4/4.step" in keys and not any(key.startswith("run/2/") for key in keys)
    assert {"run/4/context.pt", "run/4/sampler.pt", "run/4/schedulers.pt", "run/4/config.json",
            "run/4/config_file.py", "run/4/rng/rank0.pt", "run/4/deepspeed/mp_rank_00_model_states.pt"} <= keys
    marker = json.loads(s3_endpoint.client().get_object(Bucket=s3_endpoint.bucket, Key="run/4/4.step")["Body"].read())
    assert marker["step"] == 4
    # the marker lists every file of the checkpoint with the size that reached the storage (and its checksum)
    sizes = {entry["Key"]: entry["Size"] for entry in listing["Contents"]}
    assert {f"run/4/{rel}" for rel in marker["files"]} == {key for key in keys if key.startswith("run/4/")
                                                           and not key.endswith((".step", ".py"))} | {
        "run/4/config_file.py"}
    assert all(sizes[f"run/4/{rel}"] == entry["size"] and entry["checksum"] for rel, entry in marker["files"].items())
    assert not [name for name in os.listdir(tmp_path / "upload_tmp") if not name.startswith(".")], \
        "uploaded files leave the temp folder"


def test_zero1_over_two_ranks_resumes_exactly_from_s3(s3_endpoint, tmp_path):
    ckpt = dict(save_ckpt_folder=s3_endpoint.path("dp2"))
    check_exact_resume(1, 2, ckpt, s3_env(), tmp_path)
    keys = {entry["Key"] for entry in
            s3_endpoint.client().list_objects_v2(Bucket=s3_endpoint.bucket, Prefix="dp2/2/")["Contents"]}
    optimizer_partitions = {key for key in keys if key.endswith("optim_states.pt")}
    assert len(optimizer_partitions) == 2, keys  # one ZeRO-1 partition per data-parallel rank
    assert {"dp2/2/rng/rank0.pt", "dp2/2/rng/rank1.pt", "dp2/2/2.step"} <= keys


def test_pipeline_resumes_exactly_from_a_local_folder(tmp_path):
    ckpt = dict(save_ckpt_folder=f"local:{tmp_path}/ckpt")
    check_exact_resume(2, 1, ckpt, {}, tmp_path)
    saved = tmp_path / "ckpt" / "2" / "deepspeed"
    assert len(list(saved.glob("layer_*-model_00-model_states.pt"))) == 6  # embedding, 4 decoder layers, head
    assert (tmp_path / "ckpt" / "2" / "2.step").is_file() and (tmp_path / "ckpt" / "4" / "4.step").is_file()
