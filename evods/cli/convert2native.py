"""Convert an evods checkpoint (or an InternEvo native one, to other sizes) to InternEvo's native format.

    python tools/convert2native.py --src ckpts/100 --tgt internevo/100 --tp 2 --pp 2
    python tools/convert2native.py --src ckpts/100 --tgt internevo/100 --mlp_naming v2 --embed_split_hidden
    python tools/convert2native.py --src ckpts/100 --tgt internevo/100 --tp 4 --model_type INTERNLM2

An evods source also gives context.pt, sampler.pt and schedulder.pt; InternEvo's optimizer files are not written.
"""
import argparse
import sys

from evods.checkpoint import CheckpointError
from evods.checkpoint.formats.internevo_export import NATIVE_MODEL_TYPES, export_native
from evods.checkpoint.formats.internevo_layout import MLP_NAMINGS
from evods.cli import run_cli
from evods.storage import StorageError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="a checkpoint folder (local path, local:, boto3:s3://)")
    parser.add_argument("--tgt", required=True, help="the local folder to write")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the written files")
    parser.add_argument("--pp", type=int, default=1, help="pipeline size of the written files")
    parser.add_argument("--model_type", choices=tuple(NATIVE_MODEL_TYPES),
                        help="InternEvo's model type, which gives the file layout: INTERNLM (fused Wqkv, blocks.*), "
                        "INTERNLM2 (grouped wqkv, layers.*), INTERNLM3 (split wq/wk/wv); default: INTERNLM for a "
                        "multi-head model, INTERNLM2 for grouped-query attention")
    parser.add_argument("--mlp_naming", choices=tuple(MLP_NAMINGS),
                        help="v1 = InternLM (w2 up, w3 down), v2 = InternEvo since 2024-02 (w3 up, w2 down); default: "
                        "v1 for INTERNLM, v2 for INTERNLM2/INTERNLM3")
    parser.add_argument("--src_mlp_naming", choices=tuple(MLP_NAMINGS),
                        help="for a native --src; default: v1 for InternLM's names, read off the shapes for LLaMA's")
    parser.add_argument("--embed_split_hidden", action="store_true",
                        help="embedding split over hidden (model.embedding.weight) instead of vocab")
    parser.add_argument("--base", help="a LoRA checkpoint's base model (the HF folder or checkpoint it trained on): "
                        "the adapters are written merged into it")
    args = parser.parse_args(argv)

    def convert():
        export_native(args.src, args.tgt, args.tp, args.pp, args.mlp_naming, args.embed_split_hidden,
                      args.src_mlp_naming, args.model_type, args.base)
        print(f"wrote a native checkpoint (tp={args.tp}, pp={args.pp}) to {args.tgt}")

    return run_cli(convert, (CheckpointError, StorageError, OSError))


if __name__ == "__main__":
    sys.exit(main())
