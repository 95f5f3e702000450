"""The quickstart's web demo: chat with an InternLM Hugging Face folder in the browser (dynamic NTK switch, long
documents, streamed replies).

The command lives in evods/cli/web_demo.py (`evods-web-demo` once installed); see `--help`.
"""
import sys

from evods.cli.web_demo import main

if __name__ == "__main__":
    sys.exit(main())
