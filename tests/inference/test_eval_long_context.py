"""tools/eval_long_context.py on a tiny model (issue: inference people use): one row per position bucket with the
scored token counts, origin and dynamic RoPE equal below max_position_embeddings and different past it, the PNG
decodes with plain-number ticks, and a text too short for one window is one clear line."""
import re

import matplotlib.image
import pytest

from evods.cli.eval_long_context import main as eval_main
from testkit.chat_models import tiny_chat_folder
from testkit.paths import DATA

L = 64  # the tiny model's max_position_embeddings


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_chat_folder(tmp_path_factory.mktemp("long_context") / "hf")


def test_table_equal_below_l_and_the_plot(folder, tmp_path, capsys):
    plot = tmp_path / "plots" / "long.png"
    code = eval_main(["--model", str(folder), "--text", str(DATA / "pretrain_en" / "wiki_demo.txt"),
                      "--max_windows", "2", "--output", str(plot)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "max_position_embeddings 64" in out and "2 window(s) of 256 tokens" in out
    rows = re.findall(r"^\s+(\d+)-(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    assert [(int(a), int(b), int(n)) for a, b, n, _, _ in rows] == [(0, L, 2 * (L - 1)), (L, 2 * L, 2 * L),
                                                                    (2 * L, 4 * L, 2 * 2 * L)]
    origin, dynamic = zip(*[(float(o), float(d)) for *_, o, d in rows])
    assert origin[0] == dynamic[0]  # below L: the same RoPE
    assert origin[1] != dynamic[1] and origin[2] != dynamic[2]  # past L: dynamic NTK rescaled the base
    assert f"wrote the plot to {plot}" in out
    image = matplotlib.image.imread(plot)
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_a_text_shorter_than_one_window_is_one_line(folder, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.", encoding="utf-8")
    code = eval_main(["--model", str(folder), "--text", str(short), "--output", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert re.fullmatch(r"\S+: the text has 6 tokens; one window of 256 positions needs 255 \(BOS and the text\): "
                        r"give a longer text or smaller --lengths", err)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("origin, dynamic", [
    ([6005.65, 5931.96, 6338.40], [6005.65, 5994.21, 6424.62]),  # the README's held-out text: a narrow range
    ([5.1, 61.0, 912.0], [5.1, 40.2, 300.0]),  # decades apart: a log axis
])
def test_the_plot_has_readable_perplexity_ticks(origin, dynamic):
    import matplotlib.pyplot as plt

    from evods.inference.long_context import LongContextResult, long_context_figure

    result = LongContextResult([0, 256, 512, 1024], 8, [2040, 2048, 4096], {"origin": origin, "dynamic": dynamic})
    figure = long_context_figure(result, 256, "held-out text")
    figure.canvas.draw()
    axis = figure.axes[0]
    low, high = axis.get_ylim()
    shown = [label.get_text() for minor in (False, True) for label in axis.get_yticklabels(minor=minor)
             if label.get_text() and low <= label.get_position()[1] <= high]
    plt.close(figure)
    assert 2 <= len(shown) <= 10, shown  # a few ticks, not a crowd
    assert all(re.fullmatch(r"[\d,.]+", label.replace("\N{MINUS SIGN}", "-")) for label in shown), shown  # 6000, 100
