"""A checkpoint saved at one data/pipeline size resumes at another, weights and Adam state included, with no separate
conversion step (issue: checkpoints). The resumed run's losses match the uninterrupted run at the saved size. A
checkpoint saved with isp (issue 27) resumes without it, and the reverse."""
import pytest

from testkit.distributed import run_distributed
from tests.checkpoint.test_resume import SAVE_EVERY, TOTAL_STEPS, first_launch, second_launch


@pytest.mark.parametrize("saved_pipeline, saved_data", [(1, 2), (2, 1)], ids=["dp2_to_dp1", "pp2_to_pp1"])
def test_a_checkpoint_resumes_on_one_rank_after_saving_on_two(tmp_path, saved_pipeline, saved_data, caplog):
    ckpt = dict(enable_save_ckpt=True, checkpoint_every=SAVE_EVERY, auto_resume=True,
                save_ckpt_folder=f"local:{tmp_path}/ckpt")
    first = run_distributed(first_launch, 2, (saved_pipeline, saved_data, ckpt, {}, str(tmp_path)))
    reference = first[-1]["reference"]  # the last rank sees the loss on every layout
    resumed = run_distributed(second_launch, 1, (1, 1, ckpt, {}, str(tmp_path)))[0]
    assert resumed["loaded"][0] == str(SAVE_EVERY)
    assert len(resumed["losses"]) == TOTAL_STEPS - SAVE_EVERY
    # the same weights, Adam moments and data: only the summation order of the gradients differs
    assert resumed["losses"] == pytest.approx(reference["losses"][SAVE_EVERY:], abs=1e-5, rel=0)
    assert resumed["step_count"] == TOTAL_STEPS
    assert not list(tmp_path.glob("ckpt/*/universal*")), "the conversion stays out of the checkpoint folder"


ISP = dict(size=2, mode="isp")


@pytest.mark.parametrize("pipeline, saved_tensor, saved_world, resumed_tensor, resumed_world",
                         [(1, ISP, 2, 1, 1), (2, 1, 2, ISP, 4)], ids=["isp2_to_one_rank", "pp2_to_isp2_pp2"])
def test_isp_checkpoints_are_interchangeable_with_runs_without_isp(tmp_path, pipeline, saved_tensor, saved_world,
                                                                   resumed_tensor, resumed_world):
    """Two isp ranks share each row (dp 1) and ZeRO partitions over both: resuming without isp converts the
    partitions like a data-size change, and the data position carries over (the rows' data size is 1 both ways);
    the same under a pipeline, whose stages' isp ranks are DeepSpeed's data ranks."""
    ckpt = dict(enable_save_ckpt=True, checkpoint_every=SAVE_EVERY, auto_resume=True,
                save_ckpt_folder=f"local:{tmp_path}/ckpt")
    first = run_distributed(first_launch, saved_world, (pipeline, 1, ckpt, {}, str(tmp_path), saved_tensor))
    reference = first[-1]["reference"]  # the last rank is on the last pipeline stage
    assert len(set(reference["losses"])) == TOTAL_STEPS, "training moves"
    for rank in run_distributed(second_launch, resumed_world, (pipeline, 1, ckpt, {}, str(tmp_path), resumed_tensor)):
        assert rank["loaded"][0] == str(SAVE_EVERY)
        assert rank["losses"] == pytest.approx(reference["losses"][SAVE_EVERY:], abs=1e-5, rel=0)
        assert (rank["step_count"], rank["batch_count"]) == (TOTAL_STEPS, reference["batch_count"])
