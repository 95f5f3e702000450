"""The first lines of a run's log are the quickstart's: distributed sizes, the seeds, New Run; from the logging rank
only by default, from every rank (as InternEvo) with EVODS_VERBOSE=1."""
import logging
import re
from datetime import datetime

import pytest

from evods.checkpoint import LoadPlan
from evods.parallel import parallel_layout
from evods.training import startup
from evods.training.metrics import LOG_FORMAT

# The quickstart's log of the 7B demo on 8 GPUs (dp=8), as InternEvo printed it.
QUICKSTART_HOST = "SH-IDC1-10-140-0-135"
QUICKSTART_LAUNCH = datetime(2023, 7, 7, 12, 26, 58)
QUICKSTART_DISTRIBUTED = ("2023-07-07 12:26:58,293\tINFO launch.py:228 in launch -- Distributed environment is "
                          "initialized, data parallel size: 8, pipeline parallel size: 1, tensor parallel size: 1")
QUICKSTART_SEED_RANK_2 = ("2023-07-07 12:26:58,293\tINFO parallel_context.py:535 in set_seed -- initialized seed on "
                          "rank 2, numpy: 1024, python random: 1024, ParallelMode.DATA: 1024, ParallelMode.TENSOR: "
                          "1024,the default parallel seed is ParallelMode.DATA.")
QUICKSTART_NEW_RUN = [f"2023-07-07 12:26:58,296\tINFO train.py:378 in main -- ===========New Run Jul07_12-26-58 on "
                      f"host:SH-IDC1-10-140-0-135,tp:0,pp=0,dp={dp}===========" for dp in (0, 5, 1, 6, 7, 2, 4, 3)]
LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\tINFO \w+\.py:\d+ in \w+ -- (?P<message>.*)")


def message(line: str) -> str:
    """The part after InternEvo's prefix (time, level, file:line in function), which names evods' own code here."""
    match = LINE.fullmatch(line)
    assert match, line
    return match["message"]


def start_up_lines(rank: int, world: int, pp: int = 1, tp: int = 1, load_plan=None, seed: int = 1024) -> list[str]:
    """What `rank` prints at start-up, in InternEvo's log format."""
    lines = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    startup.logger.addHandler(handler)
    try:
        layout = parallel_layout(rank, world, pp=pp, tp=tp)
        startup.log_parallel_setup(layout, seed, rank)
        startup.log_run_start(layout, QUICKSTART_LAUNCH, load_plan)
    finally:
        startup.logger.removeHandler(handler)
    return lines


@pytest.fixture(autouse=True)
def quickstart_host(monkeypatch):
    monkeypatch.setattr(startup.socket, "gethostname", lambda: QUICKSTART_HOST)


def test_by_default_only_the_logging_rank_prints_them():
    ranks = {rank: [message(line) for line in start_up_lines(rank, world=8)] for rank in range(8)}
    assert all(lines == [] for rank, lines in ranks.items() if rank != 0)
    assert ranks[0][0] == message(QUICKSTART_DISTRIBUTED) and ranks[0][1].startswith("initialized seed on rank 0,")
    assert ranks[0][2] == message(QUICKSTART_NEW_RUN[0]) and len(ranks[0]) == 3


def test_verbose_the_quickstart_run_prints_the_quickstart_lines(monkeypatch):
    monkeypatch.setenv("EVODS_VERBOSE", "1")
    ranks = {rank: start_up_lines(rank, world=8) for rank in range(8)}
    # the sizes once, from the log rank; seeds and New Run from every rank
    assert [message(line) for line in ranks[0][:1]] == [message(QUICKSTART_DISTRIBUTED)]
    assert all(len(lines) == 2 for rank, lines in ranks.items() if rank != 0)
    assert message(ranks[2][0]) == message(QUICKSTART_SEED_RANK_2)
    new_runs = {message(line) for line in QUICKSTART_NEW_RUN}
    assert {message(lines[-1]) for lines in ranks.values()} == new_runs


def test_tensor_and_pipeline_ranks_get_their_seeds_and_coordinates(monkeypatch):
    monkeypatch.setenv("EVODS_VERBOSE", "1")
    # world 8 = dp 2 × pp 2 × tp 2; rank 7 is dp 1, pp 1, tp 1; the log rank is dp 0, tp 0, last stage: rank 2
    lines = {rank: [message(line) for line in start_up_lines(rank, world=8, pp=2, tp=2, seed=7)] for rank in range(8)}
    assert [rank for rank, messages in lines.items() if messages[0].startswith("Distributed")] == [2]
    assert lines[2][0].endswith("data parallel size: 2, pipeline parallel size: 2, tensor parallel size: 2")
    assert "initialized seed on rank 7, numpy: 7, python random: 7, ParallelMode.DATA: 7, ParallelMode.TENSOR: " \
           f"{7 + 1 + 1024},the default" in lines[7][0]
    assert lines[7][1] == f"===========New Run Jul07_12-26-58 on host:{QUICKSTART_HOST},tp:1,pp=1,dp=1==========="


@pytest.mark.parametrize("content, start", [(frozenset({"model", "sampler", "optimizer", "scheduler"}), "Resume"),
                                            (frozenset({"model"}), "SFT")])
def test_a_run_from_a_checkpoint_says_where_it_starts(content, start):
    plan = LoadPlan(path="local:ckpts", folder="40", content=content, ckpt_type="evods", reason="load_ckpt_info")
    last = message(start_up_lines(0, world=1, load_plan=plan)[-1])
    assert last == f"==========={start} training from `local:ckpts/40` Jul07_12-26-58 on host:{QUICKSTART_HOST}" \
                   "==========="
