"""Checkpoint formats other than evods' own: InternEvo native files, Hugging Face InternLM and Llama folders, and the
model weights inside DeepSpeed's files, all read into (and written from) full HF-named weights."""
import os

from ..errors import CheckpointError


def check_output_folder(path: str, option: str) -> None:
    """Refuse an output folder that cannot be one, before a converter reads or writes anything."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{option} {path} is a file; give a folder to write the converted checkpoint into")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise CheckpointError(f"{option} {path}: cannot create it, {parent} is not a writable folder")
