"""Convert an evods checkpoint (or an InternEvo native one, to other sizes) to InternEvo's native format.

The command lives in evods/cli/convert2native.py (`evods-convert2native` once installed); see `--help`.
"""
import sys

from evods.cli.convert2native import main

if __name__ == "__main__":
    sys.exit(main())
