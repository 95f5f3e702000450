"""Fitting a conversation into the model's context: the oldest turns go first."""
from collections.abc import Sequence
from dataclasses import dataclass


class ContextError(ValueError):
    """The query alone does not fit: its prompt is `prompt_tokens` long, the context `limit`."""

    def __init__(self, prompt_tokens: int, limit: int):
        super().__init__(f"the prompt is {prompt_tokens} tokens, past the context of {limit}")
        self.prompt_tokens, self.limit = prompt_tokens, limit


@dataclass
class Turn:
    history: list[tuple[str, str]]  # the newest turns that fit
    dropped: int  # turns left out, from the oldest
    prompt_tokens: int
    max_new_tokens: int  # what the reply may use of the context


def fit_turn(model, tokenizer, query: str, history: Sequence[tuple[str, str]], limit: int,
             max_new_tokens: int) -> Turn:
    """The newest turns of `history` whose prompt leaves room for a reply within `limit` tokens.

    The room kept for the reply is `max_new_tokens`, but at most a quarter of the context (a long conversation
    must not leave a few tokens to answer, nor a long `max_new_tokens` empty the history); the reply may use the
    whole rest. A query whose prompt alone fills the context raises ContextError.
    """
    room = min(max_new_tokens, limit // 4)
    for dropped in range(len(history) + 1):
        kept = list(history[dropped:])
        prompt_tokens = model.build_inputs(tokenizer, query, kept)["input_ids"].shape[1]
        if prompt_tokens + room <= limit or (not kept and prompt_tokens < limit):
            return Turn(kept, dropped, prompt_tokens, min(max_new_tokens, limit - prompt_tokens))
    raise ContextError(prompt_tokens, limit)
