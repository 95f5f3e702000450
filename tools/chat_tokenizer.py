"""Tokenize conversations (messages, ShareGPT or Alpaca records) into train/valid bin/meta pairs in the model's chat
format, with only the assistant's turns trained.

The command lives in evods/cli/chat_tokenizer.py (`evods-chat-tokenizer` once installed); see `--help`.
"""
import sys

from evods.cli.chat_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
