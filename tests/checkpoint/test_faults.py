"""A save killed before its marker leaves the previous checkpoint loadable; uploads that fail say so clearly and keep
the local copy (issue: checkpoints)."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from testkit.distributed import run_distributed
from testkit.paths import REPO
from testkit.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, create_bucket, s3_client, start_moto_server
from testkit.train_configs import tiny_config


def small_config(total_steps: int, ckpt: dict):
    return tiny_config(data=dict(seq_len=32, micro_bsz=2, micro_num=2, total_steps=total_steps),
                       model=dict(dtype="torch.float32"), lr_scheduler=dict(total_steps=4, warmup_ratio=0.25),
                       ckpt=dict(enable_save_ckpt=True, auto_resume=True, **ckpt))


def train_until_killed_before_marker(save_folder: str, ready_file: str) -> None:
    """Runs in a subprocess: saves at steps 2 and 4 and hangs (to be SIGKILLed) just before writing step 4's marker,
    when every file of that checkpoint is already stored."""
    from evods.storage import LocalStorage
    from evods.training.distributed import init_distributed
    from evods.training.trainer import Trainer

    write_bytes = LocalStorage.write_bytes

    def hang_at_second_marker(storage, rel, data):
        if rel.endswith("4.step"):
            Path(ready_file).write_text("saving")
            time.sleep(600)
        write_bytes(storage, rel, data)

    LocalStorage.write_bytes = hang_at_second_marker
    init_distributed("torch")
    config = small_config(4, dict(save_ckpt_folder=save_folder, checkpoint_every=2))
    Trainer(config, run_dir=Path(ready_file).parent).train()


def resume(save_folder: str, run_dir: str) -> dict:
    from evods.training.distributed import init_distributed
    from evods.training.trainer import Trainer

    init_distributed("torch")
    trainer = Trainer(small_config(4, dict(save_ckpt_folder=save_folder, checkpoint_every=2)), run_dir=Path(run_dir))
    state = trainer.train()
    return {"loaded": trainer.checkpoints.loader.loaded.folder, "trained_steps": len(state.history)}


def test_a_save_killed_before_its_marker_is_ignored_and_the_previous_one_loads(tmp_path):
    save_folder, ready = tmp_path / "ckpt", tmp_path / "ready"
    code = (f"from tests.checkpoint.test_faults import train_until_killed_before_marker as run; "
            f"run({str(save_folder)!r}, {str(ready)!r})")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not ready.exists():
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the training subprocess never reached its second save"
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    partial = save_folder / "4"
    assert (partial / "deepspeed").is_dir() and (partial / "context.pt").is_file()
    assert not (partial / "4.step").exists()

    result = run_distributed(resume, 1, (f"local:{save_folder}", str(tmp_path / "resumed")))[0]
    assert result == {"loaded": "2", "trained_steps": 2}  # steps 3 and 4 again, from the complete step-2 checkpoint
    assert (partial / "4.step").is_file(), "the re-run saved step 4 completely"


def fail_background_uploads(tmp_folder: str) -> dict:
    from evods.checkpoint import CheckpointError
    from evods.training.distributed import init_distributed
    from evods.training.trainer import Trainer

    init_distributed("torch")
    os.environ.update(S3_ACCESS_KEY_ID=ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY_ID=SECRET_ACCESS_KEY)
    server = start_moto_server()
    host, port = server.get_host_and_port()
    bucket = create_bucket(f"http://{host}:{port}")
    ckpt = dict(save_ckpt_folder=f"boto3:s3://{bucket}.{host}:{port}/run", checkpoint_every=1, async_upload=True,
                async_upload_tmp_folder=tmp_folder)
    trainer = Trainer(small_config(2, ckpt), run_dir=Path(tmp_folder).parent / "run")
    trainer.checkpoints.saver.publisher.uploader.retry_backoff_s = 0.05  # fail fast; the retries still happen
    storage, outage, gone = trainer.checkpoints.saver.storage, threading.Lock(), []
    upload_file = storage.upload_file

    def storage_goes_away_during_upload(local_path, rel, on_bytes=None):
        with outage:  # the first background upload finds the server stopping under it
            if not gone:
                server.stop()
                gone.append(True)
        upload_file(local_path, rel, on_bytes)

    storage.upload_file = storage_goes_away_during_upload
    try:
        trainer.train()
    except CheckpointError as exc:
        message = str(exc)
    else:
        message = None
    revived = start_moto_server()  # moto keeps its buckets per process: see what reached the storage
    stored = s3_client(f"http://{revived.get_host_and_port()[0]}:{revived.get_host_and_port()[1]}").list_objects_v2(
        Bucket=bucket).get("Contents", [])
    revived.stop()
    return {"message": message, "stored": [entry["Key"] for entry in stored],
            "kept": sorted(name for name in os.listdir(tmp_folder) if name.endswith(".not-uploaded"))}


def test_storage_lost_during_background_upload_is_a_clear_error_and_keeps_the_local_copy(tmp_path):
    result = run_distributed(fail_background_uploads, 1, (str(tmp_path / "upload_tmp"),))[0]
    message = result["message"]
    assert message is not None, "training must not finish as if the checkpoint were stored"
    assert "checkpoint of step 1" in message and "incomplete" in message and "no marker" in message
    assert "the data is kept at" in message
    assert not any(key.endswith(".step") for key in result["stored"])
    kept = result["kept"]
    assert any(name.startswith("context.pt") for name in kept) and any("model_states" in name for name in kept)
