"""Perplexity by position, with plain and with dynamic NTK RoPE: what dynamic NTK buys past max_position_embeddings.

A bucket [start, end) of positions is scored the way a user meets it: the model reads the window's first `end` tokens
(so dynamic NTK sets its RoPE base for a sequence of `end` tokens, as in generation from an `end`-token prompt) and
the loss is taken on the tokens at positions start..end-1. Below max_position_embeddings both RoPEs are the same
computation, so their perplexities are equal there.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .options import InferenceError

ROTARIES = ("origin", "dynamic")


@dataclass
class LongContextResult:
    bounds: list[int]  # bucket i is positions bounds[i]..bounds[i+1]-1
    windows: int  # windows of bounds[-1] tokens the text gave
    tokens: list[int]  # scored tokens per bucket, over all windows
    perplexity: dict[str, list[float]]  # rotary type -> perplexity per bucket

    def table(self) -> str:
        rows = [f"{'positions':>14} {'tokens':>8} " + " ".join(f"{name + ' ppl':>12}" for name in ROTARIES)]
        for i, scored in enumerate(self.tokens):
            positions = f"{self.bounds[i]}-{self.bounds[i + 1]}"
            rows.append(f"{positions:>14} {scored:>8} "
                        + " ".join(f"{self.perplexity[name][i]:>12.2f}" for name in ROTARIES))
        return "\n".join(rows)


def bucket_bounds(max_position_embeddings: int, multiples: list[float]) -> list[int]:
    """[0, m1*L, m2*L, ...] for L = max_position_embeddings; the multiples must grow."""
    bounds = [0, *(round(m * max_position_embeddings) for m in multiples)]
    if any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise InferenceError(f"--lengths {','.join(map(str, multiples))}: give growing positive multiples of "
                             f"max_position_embeddings ({max_position_embeddings}), e.g. 1,2,4")
    return bounds


def text_windows(token_ids: list[int], bos_id: int, length: int, max_windows: int | None) -> torch.Tensor:
    """Consecutive windows of `length` tokens (BOS, then the text's next length-1 tokens): (windows, length)."""
    body = length - 1
    count = len(token_ids) // body
    if count == 0:
        raise InferenceError(f"the text has {len(token_ids)} tokens; one window of {length} positions needs {body} "
                             "(BOS and the text): give a longer text or smaller --lengths")
    count = min(count, max_windows) if max_windows else count
    rows = torch.tensor(token_ids[:count * body]).view(count, body)
    return torch.cat([torch.full((count, 1), bos_id), rows], dim=1)


@torch.no_grad()
def bucket_losses(model, window: torch.Tensor, bounds: list[int]) -> list[float]:
    """Summed next-token losses of the positions of each bucket (position 0, BOS, is never a target)."""
    sums = []
    for start, end in zip(bounds, bounds[1:]):
        ids = window[:end].unsqueeze(0).to(model.device)
        first = max(start, 1)
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=end - first + 1).logits[0, :-1].float()
        sums.append(F.cross_entropy(logits, ids[0, first:end], reduction="sum").item())
    return sums


def evaluate_long_context(model, windows: torch.Tensor, bounds: list[int], progress: bool = True) \
        -> LongContextResult:
    """Perplexity per bucket with origin and with dynamic RoPE, over all windows (token-weighted). The model's
    rotary type is restored afterwards."""
    configured = model.config.rotary["type"]
    tokens = [end - max(start, 1) for start, end in zip(bounds, bounds[1:])]
    perplexity = {}
    try:
        for rotary in ROTARIES:
            model.set_rotary_type(rotary)
            totals = [0.0] * len(tokens)
            for window in tqdm(windows, desc=f"{rotary} RoPE", unit="window", disable=not progress):
                totals = [total + loss for total, loss in zip(totals, bucket_losses(model, window, bounds))]
            perplexity[rotary] = [math.exp(total / (count * len(windows))) for total, count in zip(totals, tokens)]
    finally:
        model.set_rotary_type(configured)
    return LongContextResult(bounds, len(windows), [count * len(windows) for count in tokens], perplexity)


def long_context_figure(result: LongContextResult, max_position_embeddings: int, title: str):
    """The bars of `result` (a matplotlib Figure). The perplexity axis is logarithmic only when the values span more
    than a factor of ten, with plain numbers as ticks: a log axis over a narrow range shows only cramped minor
    ticks in scientific notation (5.95×10³, 6×10³, ...)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    labels = [f"{a}-{b}" for a, b in zip(result.bounds, result.bounds[1:])]
    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=100)
    width = 0.38
    for offset, rotary in zip((-width / 2, width / 2), ROTARIES):
        bars = axis.bar([i + offset for i in range(len(labels))], result.perplexity[rotary], width,
                        label=f"{rotary} RoPE")
        axis.bar_label(bars, fmt="%.1f", fontsize=8)
    axis.set_xticks(range(len(labels)), labels)
    axis.set_xlabel(f"positions (max_position_embeddings = {max_position_embeddings})")
    axis.set_ylabel("perplexity")
    values = [value for rotary in ROTARIES for value in result.perplexity[rotary]]
    if max(values) > 10 * min(values):
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.yaxis.set_minor_formatter(NullFormatter())
    axis.set_title(title, fontsize=10)
    axis.legend()
    axis.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    return figure


def plot_long_context(result: LongContextResult, max_position_embeddings: int, title: str, output) -> None:
    import matplotlib.pyplot as plt

    figure = long_context_figure(result, max_position_embeddings, title)
    figure.savefig(output)
    plt.close(figure)
