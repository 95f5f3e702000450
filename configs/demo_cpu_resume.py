# Resume the run of `make demo` from its last checkpoint and train as many steps again (README, "Checkpoints"):
#   OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu deepspeed --quiet --num_gpus 2 train_ds.py --config configs/demo_cpu_resume.py
# load_ckpt_info with content ("all",) restores the weights, Adam's state, the data position, the step count and the
# schedules' progress, so the log goes on from step 40; the schedules' shape (now 80 steps long) comes from this
# config, as in InternEvo. The checkpoint of step 80 goes beside step 40, in demo_out/ckpt.
import os.path
import runpy

globals().update({name: value for name, value in runpy.run_path(
    os.path.join(os.path.dirname(__file__), "demo_cpu.py")).items() if not name.startswith("__")})

JOB_NAME = "demo_cpu_resume"
RESUME_STEP = TOTAL_STEPS  # noqa: F821 (from demo_cpu.py: the demo saves its last step)
TOTAL_STEPS = 2 * RESUME_STEP
data["total_steps"] = lr_scheduler["total_steps"] = TOTAL_STEPS  # noqa: F821
ckpt.update(  # noqa: F821
    checkpoint_every=TOTAL_STEPS,
    load_ckpt_info=dict(path=f"local:demo_out/ckpt/{RESUME_STEP}", content=("all",), ckpt_type="evods"),
)
