"""Faults and hostile files (issue: faults and trust): a stop during validation saves first and resumes exactly;
damaged newest checkpoints fall back with one line each; checkpoint files never run code; storage faults end in one
line per job; written files honour the umask; converters check their arguments before writing."""
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from testkit.checkpoints import write_evods_checkpoint
from testkit.distributed import free_port, run_distributed
from testkit.paths import REPO
from testkit.train_configs import tiny_config

TOTAL_STEPS = 4


def faults_config(total_steps: int, ckpt: dict, **model):
    return tiny_config(data=dict(seq_len=32, micro_bsz=2, micro_num=1, total_steps=total_steps, valid_every=1),
                       model=dict(dtype="torch.float32", **model),
                       lr_scheduler=dict(total_steps=TOTAL_STEPS, warmup_ratio=0.25),
                       ckpt={"enable_save_ckpt": True, "checkpoint_every": 1, "auto_resume": True, **ckpt})


class Payload:
    """What a hostile checkpoint plants: unpickling it writes a file (it could run anything)."""

    def __init__(self, proof: str):
        self.proof = proof

    def __reduce__(self):
        return Path.write_text, (Path(self.proof), "code ran")


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def capture_warnings() -> Captured:
    handler = Captured()
    logging.getLogger("evods").addHandler(handler)
    return handler


def train(cfg, run_dir: str) -> dict:
    from evods.training.trainer import Trainer

    trainer = Trainer(cfg, run_dir=Path(run_dir))
    state = trainer.train()
    trainer.close()
    loaded = trainer.checkpoints.loader.loaded
    return {"losses": [entry["loss"] for entry in state.history], "loaded": loaded and loaded.folder}


def error_of(cfg, run_dir: str) -> str:
    from evods.training.trainer import Trainer

    try:
        Trainer(cfg, run_dir=Path(run_dir)).train()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


# ------------------------------------------------------------------------------------------ launch 1: the stop


def stop_during_validation(save: str, run_root: str) -> dict:
    """The uninterrupted reference, then a run that gets SIGINT (on every rank, as Ctrl-C gives it) while the
    validation after step 3 runs."""
    os.umask(0o022)
    from evods.training.distributed import init_distributed
    from evods.training.trainer import Trainer

    init_distributed("torch")
    reference = train(faults_config(TOTAL_STEPS, dict(enable_save_ckpt=False)), f"{run_root}/reference")
    warnings = capture_warnings()
    trainer = Trainer(faults_config(TOTAL_STEPS, dict(save_ckpt_folder=f"local:{save}")), run_dir=Path(run_root))
    eval_loss, eval_calls = trainer.engine.eval_loss, []

    def eval_loss_interrupted_at_step_3(*args):
        eval_calls.append(trainer.state.step_count)
        if eval_calls.count(3) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return eval_loss(*args)

    trainer.engine.eval_loss = eval_loss_interrupted_at_step_3
    handler_before = signal.getsignal(signal.SIGINT)
    state = trainer.train()
    trainer.close()
    return {"reference": reference["losses"], "interrupted": [entry["loss"] for entry in state.history],
            "eval_calls": eval_calls, "warnings": warnings.lines,
            "sigint_handler_restored": signal.getsignal(signal.SIGINT) is handler_before}


def test_sigint_during_validation_saves_the_last_step_and_the_restart_continues_exactly_despite_damage(tmp_path):
    save = tmp_path / "ckpt"
    first = run_distributed(stop_during_validation, 2, (str(save), str(tmp_path / "first")))
    rank0 = first[0]
    assert rank0["interrupted"] == rank0["reference"][:3]
    # validation after steps 1 and 2 ran every batch; after step 3 it stopped at the first one
    full = rank0["eval_calls"].count(1)
    assert full > 1 and rank0["eval_calls"].count(3) == 1
    assert any("cut short by the stop request" in line for line in rank0["warnings"])
    assert any(line.startswith("saving step 3… (a stop was requested") for line in rank0["warnings"])
    assert any(line.startswith("saved step 3: its checkpoint is complete") and line.endswith("after the stop request")
               for line in rank0["warnings"])
    assert (save / "3" / "3.step").is_file() and rank0["sigint_handler_restored"]

    second = run_distributed(resume_with_damage, 2, (str(save), str(tmp_path / "second")))
    result = second[0]
    assert result["resumed"] == {"losses": rank0["reference"][3:], "loaded": "3"}  # the exact-resume comparison
    # 4 truncated, 3 with one flipped byte, 2 with a planted pickle (and a marker that vouches for it): one line each,
    # then step 1 loads and steps 2-4 train exactly as the uninterrupted run did
    assert result["after_damage"] == {"losses": rank0["reference"][1:], "loaded": "1"}
    damaged = [line for line in result["warnings"] if line.startswith("checkpoint ") and "is damaged" in line]
    assert len(damaged) == 3, damaged
    assert f"{save}/4" in damaged[0] and "mp_rank_00_model_states.pt has" in damaged[0] and "truncated" in damaged[0]
    assert f"{save}/3" in damaged[1] and "does not match its xxh3_64 checksum" in damaged[1]
    assert f"{save}/2" in damaged[2] and "which is not tensor data" in damaged[2] and "pathlib.PosixPath" in damaged[2]
    assert not result["payload_ran"]
    # the start-up banner names the checkpoint that was loaded, not the damaged one first chosen
    [banner] = result["banners"]
    assert banner.startswith(f"===========Resume training from `local:{save}/1` "), banner
    # with the fallback off, the damaged newest checkpoint is one clear error, raised by rank 0 only
    assert result["no_fallback"].startswith("CheckpointError: checkpoint") and f"{save}/4" in result["no_fallback"]
    assert "auto_resume_fallback=False" in result["no_fallback"] and "\n" not in result["no_fallback"]
    assert second[1]["no_fallback"].startswith("FailedOnAnotherRank")
    # a checkpoint of another model size: one line before any weight is loaded, by auto_resume and by load_ckpt_info
    for key in ("other_model_auto_resume", "other_model_load_ckpt_info"):
        assert result[key].startswith("CheckpointError: ") and "holds another model" in result[key], result[key]
        assert "hidden_size 64 there, 32 here" in result[key] and "\n" not in result[key]
    assert "Point save_ckpt_folder at" in result["other_model_auto_resume"]
    # files evods writes honour the umask, as DeepSpeed's do
    assert result["modes"] and set(result["modes"].values()) == {0o644}, result["modes"]


def resume_with_damage(save: str, run_root: str) -> dict:
    os.umask(0o022)
    import torch.distributed as dist

    from evods.checkpoint.marker import Manifest, digest_file
    from evods.training.distributed import init_distributed

    init_distributed("torch")
    ckpt = dict(save_ckpt_folder=f"local:{save}")
    resumed = train(faults_config(TOTAL_STEPS, ckpt), f"{run_root}/resumed")
    folder = Path(save)
    modes = {str(path.relative_to(folder)): path.stat().st_mode & 0o777 for path in (folder / "4").rglob("*")
             if path.is_file() and not path.name.startswith("zero_to_")}  # DeepSpeed's scripts are executable
    proof = Path(run_root) / "payload-ran"
    if dist.get_rank() == 0:
        truncate(folder / "4" / "deepspeed" / "mp_rank_00_model_states.pt")
        flip_one_byte(next((folder / "3" / "deepspeed").glob("zero_pp_rank_1_*optim_states.pt")))
        plant_payload(folder / "2", "deepspeed/mp_rank_00_model_states.pt", str(proof), Manifest, digest_file)
    dist.barrier()
    warnings = capture_warnings()
    banners = Captured()
    banners.setLevel(logging.INFO)
    logging.getLogger("evods.startup").addHandler(banners)
    after_damage = train(faults_config(TOTAL_STEPS, ckpt), f"{run_root}/after_damage")
    logging.getLogger("evods.startup").removeHandler(banners)
    if dist.get_rank() == 0:
        truncate(folder / "4" / "context.pt")
    dist.barrier()
    no_fallback = error_of(faults_config(TOTAL_STEPS, {**ckpt, "auto_resume_fallback": False}), f"{run_root}/nf")
    other_auto = error_of(faults_config(TOTAL_STEPS, ckpt, hidden_size=32), f"{run_root}/other")
    load_info = dict(path=f"local:{save}/3", content=("all",), ckpt_type="evods")
    other_info = error_of(faults_config(TOTAL_STEPS, dict(enable_save_ckpt=False, save_ckpt_folder=None,
                                                          auto_resume=False, load_ckpt_info=load_info),
                                        hidden_size=32), f"{run_root}/other_info")
    return {"resumed": resumed, "after_damage": after_damage, "warnings": warnings.lines, "modes": modes,
            "payload_ran": proof.exists(), "no_fallback": no_fallback, "other_model_auto_resume": other_auto,
            "banners": [line for line in banners.lines if line.startswith("===========")],
            "other_model_load_ckpt_info": other_info}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def plant_payload(checkpoint: Path, rel: str, proof: str, manifest_type, digest_file) -> None:
    """Put a pickle payload into a file of `checkpoint` and re-sign its marker, as a crafted download would."""
    target = checkpoint / rel
    state = torch.load(target, weights_only=False)
    state["module"]["payload"] = Payload(proof)
    torch.save(state, target)
    marker = next(checkpoint.glob("*.step"))
    manifest = manifest_type.from_bytes(marker.read_bytes(), str(marker))
    manifest.files[rel] = digest_file(str(target))
    marker.write_bytes(manifest.to_bytes())


def test_a_stop_that_is_not_saved_in_time_says_so_before_the_launcher_kills(caplog):
    import time

    from evods.training.stopping import GracefulStop, kill_window_s

    assert kill_window_s({}) == 30  # DeepSpeed's launcher and Slurm's default KillWait
    assert kill_window_s({"TORCHELASTIC_RUN_ID": "x", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "90"}) == 90
    handler = signal.getsignal(signal.SIGTERM)
    stop = GracefulStop(kill_window=0.3)
    try:
        with caplog.at_level(logging.WARNING, logger="evods"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # no checkpoint comes: the warning is due at two thirds of the window
    finally:
        stop.close()
    assert stop.requested and signal.getsignal(signal.SIGTERM) is handler
    assert "received SIGTERM: finishing this step, then saving a checkpoint and stopping" in caplog.text
    assert "its checkpoint is not complete yet: launchers kill the ranks about 0 s after" in caplog.text


def hear_of_a_gone_launcher_from_the_other_rank() -> dict:
    """Both ranks' launcher is gone; rank 1's watch sees it at once, the logging rank 0's would only in an hour:
    rank 0 learns of the stop from the ranks' agreement."""
    import subprocess
    import time

    import psutil
    import torch.distributed as dist

    from evods.training import stopping

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    finished = subprocess.Popen(["true"])
    launcher = psutil.Process(finished.pid)
    finished.wait()
    stopping.WATCH_EVERY_S = 3600 if rank == 0 else 0.01
    said = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("evods").addHandler(handler)
    stop = stopping.GracefulStop(speaks=rank == 0, launchers=[launcher])
    deadline = time.monotonic() + 30
    while rank == 1 and not stop.requested and time.monotonic() < deadline:
        time.sleep(0.01)
    dist.barrier()
    agreed = stop.agreed()
    stop.close()
    return {"rank": rank, "agreed": agreed, "said": said, "pid": launcher.pid}


def test_the_logging_rank_says_the_launcher_is_gone_when_another_rank_saw_it_first():
    """A stop is agreed at a step's end; the logging rank, told of it by another rank, says why when the cause is
    its own launcher too (the ranks of a node share them), and says it once."""
    ranks = sorted(run_distributed(hear_of_a_gone_launcher_from_the_other_rank, 2, ()), key=lambda r: r["rank"])
    assert [rank["agreed"] for rank in ranks] == [True, True]
    assert ranks[0]["said"] == [f"the launcher that started this job (pid {ranks[0]['pid']}) is gone: finishing "
                                "this step, then saving a checkpoint and stopping"]
    assert ranks[1]["said"] == []  # not a logging rank


# ------------------------------------------------------------------------------------------ hostile files


def run_tool(main, args: list[str], capsys) -> tuple[int, str]:
    """A tool's main() in this process, as its command line runs it: (exit code, what it printed on stderr)."""
    code = main(args)
    return code, capsys.readouterr().err


def test_checkpoint_files_with_a_pickle_payload_are_refused_without_running_it(tmp_path, capsys):
    from evods.checkpoint import CheckpointError, read_native_model
    from tools.convert2hf import main as convert2hf
    from tools.convert2native import main as convert2native

    proof = tmp_path / "payload-ran"
    model_file = tmp_path / "model_payload"
    write_evods_checkpoint(model_file, module_extra={"payload": Payload(str(proof))})
    context_file = tmp_path / "context_payload"
    write_evods_checkpoint(context_file, context_extra={"payload": Payload(str(proof))})
    # a model file, through the converter users run on downloads
    code, err = run_tool(convert2hf, ["--src", str(model_file), "--tgt", str(tmp_path / "hf")], capsys)
    assert code == 1 and not (tmp_path / "hf").exists()
    assert "mp_rank_00_model_states.pt holds " in err and "pathlib.PosixPath" in err and "not tensor data" in err
    assert err.count("\n") == 1, err
    # a context file, through the native exporter (which carries the run state over)
    code, err = run_tool(convert2native, ["--src", str(context_file), "--tgt", str(tmp_path / "native")], capsys)
    assert code == 1 and "context.pt holds " in err and "pathlib.PosixPath" in err, err
    # an InternEvo native model file
    native = tmp_path / "native_payload"
    native.mkdir()
    torch.save({"model.payload": Payload(str(proof))}, native / "model_tp0_pp0.pt")
    torch.save({"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "vocab_size": 64},
               native / "model_config.pt")
    with pytest.raises(CheckpointError, match="model_tp0_pp0.pt holds .*pathlib.PosixPath.*not tensor data"):
        read_native_model(str(native))
    assert not proof.exists(), "unpickling ran the payload"


def test_converters_check_every_argument_before_writing(tmp_path, capsys):
    from tools.convert2hf import main as convert2hf
    from tools.convert2native import main as convert2native

    checkpoint = tmp_path / "ckpt"
    write_evods_checkpoint(checkpoint)
    hf = ["--src", str(checkpoint), "--tgt", str(tmp_path / "hf")]
    for option, value, words in (("--tokenizer", "V7_sft.model", "no such file"),
                                 ("--tokenizer", str(checkpoint / "config.json"), "not a SentencePiece model"),
                                 ("--max_shard", "ten gigs", "give a size")):
        code, err = run_tool(convert2hf, [*hf, option, value], capsys)
        assert code == 1 and words in err, err
        assert not (tmp_path / "hf").exists(), f"{option} {value}: something was written"
    previous = os.umask(0o022)
    try:
        code, err = run_tool(convert2hf, [*hf, "--tokenizer", str(REPO / "tools" / "V7_sft.model")], capsys)
    finally:
        os.umask(previous)
    assert code == 0, err  # the README's command
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "hf").iterdir()}
    assert modes["config.json"] == modes["model.safetensors"] == modes["tokenizer.model"] == 0o644, modes
    (tmp_path / "a_file").write_text("")
    code, err = run_tool(convert2native, ["--src", str(checkpoint), "--tgt", str(tmp_path / "a_file")], capsys)
    assert code == 1 and "is a file" in err


def test_a_damaged_checkpoint_does_not_convert(tmp_path):
    from evods.checkpoint import CheckpointError, read_checkpoint_model

    checkpoint = tmp_path / "ckpt"
    write_evods_checkpoint(checkpoint)
    flip_one_byte(checkpoint / "deepspeed" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="is damaged: deepspeed/mp_rank_00_model_states.pt does not match"):
        read_checkpoint_model(str(checkpoint))


@pytest.mark.parametrize("marker, reason", [
    (b"", "is empty"),
    (b'{"step": 5, "files": {"context', "is not a valid marker (JSONDecodeError: Unterminated string"),
    (b'{"step": 5, "files": {"context.pt": {"size": "ten"}}}', "is not a valid marker (ValueError: invalid literal"),
    (b'{"step": 4, "files": {}}', "records step 4: it was copied or renamed from another checkpoint"),
])
def test_an_empty_or_corrupt_step_marker_is_one_line_for_every_reader(tmp_path, capsys, marker, reason):
    from evods.checkpoint.errors import DamagedCheckpoint
    from evods.checkpoint.resume.catalogue import read_catalogue_on_rank0
    from evods.checkpoint.resume.plan import ALL_CONTENT, LoadPlan
    from tools.convert2hf import main as convert2hf
    from tools.convert2native import main as convert2native

    checkpoint = tmp_path / "ckpt" / "5"
    write_evods_checkpoint(checkpoint)
    (checkpoint / "5.step").write_bytes(marker)
    expected = f"the step marker {checkpoint / '5.step'} {reason}"
    for convert in (convert2hf, convert2native):
        code, err = run_tool(convert, ["--src", str(checkpoint), "--tgt", str(tmp_path / "out")], capsys)
        assert code == 1 and expected in err and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()
    # what a resume reads first (rank 0, then shared); auto-resume falls back from this error to the previous one
    with pytest.raises(DamagedCheckpoint) as error:
        read_catalogue_on_rank0(LoadPlan(f"local:{tmp_path / 'ckpt'}", "5", ALL_CONTENT, "evods", "auto_resume"))
    assert expected in str(error.value) and "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------ small guarantees


def test_written_files_honour_the_umask(tmp_path):
    from evods.storage import LocalStorage

    previous = os.umask(0o022)
    try:
        storage = LocalStorage(tmp_path)
        storage.write_bytes("10/10.step", b"{}")
        (tmp_path / "src").write_bytes(b"x")
        storage.upload_file(tmp_path / "src", "10/model.pt")
    finally:
        os.umask(previous)
    assert (tmp_path / "10" / "10.step").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "10" / "model.pt").stat().st_mode & 0o777 == 0o644


def test_long_transfers_print_progress_lines(tmp_path, caplog, monkeypatch):
    from evods import progress
    from evods.checkpoint.save.upload import Publisher
    from evods.storage import LocalStorage

    monkeypatch.setattr(progress, "FIRST_LINE_AFTER_S", 0.0)
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "model.pt").write_bytes(b"x" * (3 << 20))
    with caplog.at_level(logging.INFO, logger="evods"):
        Publisher(LocalStorage(tmp_path / "store")).move_folder(str(staged), "7", "the checkpoint of step 7")
    lines = [record.getMessage() for record in caplog.records]
    assert any(line.startswith("uploading the checkpoint of step 7: 1.0 MiB of 3.0 MiB (33%)") for line in lines)
    assert lines[-1].startswith("uploading the checkpoint of step 7: done, 3.0 MiB in")


def test_auto_resume_says_which_folders_it_skips_and_load_paths_must_exist(tmp_path, caplog):
    from evods.checkpoint import CheckpointError, choose_load_plan
    from testkit.train_configs import tiny_config

    (tmp_path / "ckpt" / "8" / "deepspeed").mkdir(parents=True)  # a save that was killed before its marker
    cfg = tiny_config(ckpt=dict(save_ckpt_folder=f"local:{tmp_path}/ckpt", auto_resume=True))
    from evods.storage import open_storage

    with caplog.at_level(logging.WARNING, logger="evods"):
        assert choose_load_plan(cfg.ckpt, open_storage(cfg.ckpt.save_ckpt_folder)) is None
    assert f"skipping {tmp_path}/ckpt/8: it has no step marker" in caplog.text
    missing = tiny_config(ckpt=dict(load_ckpt_info=dict(path=f"local:{tmp_path}/nowhere", content=("model",),
                                                         ckpt_type="evods")))
    with pytest.raises(CheckpointError, match="nowhere does not exist"):
        choose_load_plan(missing.ckpt, None)


# ------------------------------------------------------------------------------------------ storage faults


STORAGE_FAULT_CONFIG = """exec(open({demo!r}).read())
model.update(hidden_size=64, num_layers=2, num_attention_heads=4, vocab_size=512)
data.update(seq_len=32, total_steps=2)
lr_scheduler.update(total_steps=2)
ckpt.update(enable_save_ckpt=True, save_ckpt_folder={folder!r}, checkpoint_every=1, auto_resume=False)
"""

# Runs inside a user and mount namespace (unshare), where this test may mount: a read-only file system and a 256 KiB
# one that the first checkpoint fills. Two ranks per job, as torchrun would start them.
NAMESPACE_SCRIPT = """set -e
mount -t tmpfs -o ro,size=64k tmpfs {tmp}/mnt_readonly
mount -t tmpfs -o size=256k tmpfs {tmp}/mnt_full
run_rank() {{
  RANK=$2 LOCAL_RANK=$2 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$3 {python} train_ds.py --launcher torch \\
    --config {tmp}/$1.py --run_dir {tmp}/run_$1 > {tmp}/$1.out.$2 2> {tmp}/$1.err.$2
}}
job() {{
  run_rank $1 0 $2 & rank0=$!
  run_rank $1 1 $2 & rank1=$!
  for pid in $rank0 $rank1; do
    if wait $pid; then echo 0 >> {tmp}/$1.rc; else echo $? >> {tmp}/$1.rc; fi
  done
}}
job readonly {port_readonly}
job full {port_full}
"""


def test_read_only_and_full_checkpoint_disks_are_one_line_per_job(tmp_path):
    for job in ("readonly", "full"):
        (tmp_path / f"mnt_{job}").mkdir()
        (tmp_path / f"{job}.py").write_text(STORAGE_FAULT_CONFIG.format(
            demo=str(REPO / "configs" / "demo_cpu.py"), folder=f"local:{tmp_path}/mnt_{job}/ckpt"))
    script = NAMESPACE_SCRIPT.format(tmp=tmp_path, python=sys.executable, port_readonly=free_port(),
                                     port_full=free_port())
    namespace = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=REPO,
                               capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert namespace.returncode == 0, f"could not set up the file systems: {namespace.stderr}"
    for job, words in (("readonly", "Read-only file system; the file system is mounted read-only"),
                       ("full", "No space left on device; the disk is full")):
        assert (tmp_path / f"{job}.rc").read_text().split() == ["2", "2"], job
        errors = [(tmp_path / f"{job}.err.{rank}").read_text() for rank in (0, 1)]
        lines = [line for err in errors for line in err.splitlines() if line.startswith("train_ds.py: ")]
        assert len(lines) == 1, (job, lines, errors[0][-2000:], errors[1][-2000:])  # once per job, not per rank
        assert words in lines[0] and f"{tmp_path}/mnt_{job}/ckpt" in lines[0], lines[0]
        assert not any("Traceback" in err for err in errors), errors
