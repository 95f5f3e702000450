"""The --model folder of the inference commands (chat, web_demo, generate, serve, eval_long_context): a training
checkpoint given there by mistake is one line with the convert2hf command that makes a Hugging Face folder of it."""
import os
from pathlib import Path

from evods.inference import InferenceError


def check_not_a_training_checkpoint(model: str | Path) -> None:
    folder = Path(model)
    names = os.listdir(folder) if folder.is_dir() else []
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    if set(names) & {SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME}:
        return
    # only for a folder without HF weights: the checkpoint package imports DeepSpeed, which takes seconds
    from evods.checkpoint import is_training_checkpoint

    if is_training_checkpoint(names):
        target = Path("hf") / f"{folder.resolve().parent.name}_{folder.name}"
        raise InferenceError(f"--model {folder} is a training checkpoint, not a Hugging Face folder: convert it first "
                             f"(python tools/convert2hf.py --src {folder} --tgt {target} --tokenizer "
                             f"tools/V7_sft.model; evods-convert2hf once installed), then give --model {target}")
