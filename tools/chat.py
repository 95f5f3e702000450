"""Chat in the terminal with an InternLM Hugging Face folder (streamed replies, history, dynamic NTK switch).

The command lives in evods/cli/chat.py (`evods-chat` once installed); see `--help`.
"""
import sys

from evods.cli.chat import main

if __name__ == "__main__":
    sys.exit(main())
