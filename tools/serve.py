"""An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models) on an exported folder.

The command lives in evods/cli/serve.py (`evods-serve` once installed); see `--help`.
"""
import sys

from evods.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
