"""Checkpoint formats other than evods' own: InternEvo native files, Hugging Face InternLM and Llama folders, and the
model weights inside DeepSpeed's files, all read into (and written from) full HF-named weights."""
