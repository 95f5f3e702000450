"""An error while one rank writes its part of a checkpoint stops every rank, instead of leaving the others waiting
in the next collective until the process-group timeout."""
from testkit.distributed import run_distributed


def fail_on_rank_one() -> str:
    import datetime

    import torch.distributed as dist

    from evods.checkpoint.collective import agree_on_failure

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))

    def work():
        if dist.get_rank() == 1:
            raise OSError("disk full")
        return "written"

    try:
        agree_on_failure("writing the checkpoint of step 7", work)
    except Exception as error:  # each rank reports what it raised
        return f"{type(error).__name__}: {error}"
    return "no error"


def test_a_failure_on_one_rank_is_raised_on_every_rank():
    rank0, rank1 = run_distributed(fail_on_rank_one, world=2, timeout=120)
    assert rank1 == "OSError: disk full"
    # rank 0 stops too, with the reason, marked so that commands leave the report to rank 1 (one line per job)
    assert rank0 == "FailedOnAnotherRank: writing the checkpoint of step 7 failed on another rank: rank 1: disk full"
