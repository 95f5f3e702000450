"""Convert an evods checkpoint or an InternEvo native one (model_tp*_pp*.pt, InternLM's or its LLaMA-family names), of
any tp/pp, to one Hugging Face folder.

The command lives in evods/cli/convert2hf.py (`evods-convert2hf` once installed); see `--help`.
"""
import sys

from evods.cli.convert2hf import main

if __name__ == "__main__":
    sys.exit(main())
