"""An OpenAI-compatible HTTP server on a Hugging Face folder written by tools/convert2hf.py (InternLM or Llama
layout): /v1/models, /v1/chat/completions and /v1/completions, streamed or not, with the folder's chat template,
end-of-reply ids and RoPE (dynamic NTK as exported).

    python tools/serve.py --model hf/my_model                        # http://127.0.0.1:8000/v1, model "hf/my_model"
    python tools/serve.py --model hf/my_model --host 0.0.0.0 --api_key "$(openssl rand -hex 16)"

It binds 127.0.0.1 unless --host says otherwise; any other address needs an API key (--api_key or EVODS_API_KEY),
which clients send as `Authorization: Bearer KEY` (the openai client's api_key).
"""
import argparse
import ipaddress
import os
import socket
import sys

from evods.cli import run_cli

DTYPES = ("auto", "float32", "bfloat16", "float16")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a Hugging Face folder (tools/convert2hf.py writes one)")
    parser.add_argument("--served_model_name", default=None,
                        help="the name clients ask for (default: --model as given, as vLLM does)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                            "only); any other needs --api_key")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    parser.add_argument("--api_key", default=os.environ.get("EVODS_API_KEY"),
                        help="the key clients must send (default: $EVODS_API_KEY; none: no key asked on 127.0.0.1)")
    parser.add_argument("--max_context", type=int, default=None,
                        help="tokens of prompt and reply with dynamic NTK RoPE (default 4 x max_position_embeddings); "
                             "otherwise the context is max_position_embeddings")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: the folder's dtype on CUDA, float32 on "
                                                                         "the CPU")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="run the tokenizer code a published InternLM folder ships (tokenization_internlm.py)")
    args = parser.parse_args(argv)
    if not is_loopback(args.host) and not args.api_key:
        parser.error(f"--host {args.host} lets other machines reach the server: give an --api_key too "
                     "(or set EVODS_API_KEY)")
    if args.max_context is not None and args.max_context < 2:
        parser.error("give --max_context >= 2")
    from evods.inference import InferenceError  # after parsing: --help stays fast

    return run_cli(lambda: serve(args), (InferenceError, OSError))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def serve(args) -> None:
    from evods.inference import InferenceError

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise InferenceError("the server needs FastAPI and uvicorn: pip install -e .[serve]  (or pip install "
                             "'evods[serve]')") from None
    from evods.cli.model_folder import check_not_a_training_checkpoint
    from evods.inference.loading import context_limit, load_for_serving
    from evods.inference.server import Engine, create_app

    check_not_a_training_checkpoint(args.model)
    # the port first: a port in use is one line before minutes of loading
    listener = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.host, args.port))
    model, tokenizer = load_for_serving(args.model, args.dtype, args.device, args.trust_remote_code)
    limit = context_limit(model.config, args.max_context)
    engine = Engine(model, tokenizer, args.served_model_name or args.model, limit)
    port = listener.getsockname()[1]
    print(f"evods-serve: {engine.name!r} ({type(model).__name__}, {model.config.num_hidden_layers} layers, context "
          f"{limit} tokens, {model.dtype} on {model.device}) at http://{args.host}:{port}/v1"
          f"{' (API key required)' if args.api_key else ''}; Ctrl-C stops", flush=True)
    config = uvicorn.Config(create_app(engine, args.api_key), log_level="info", timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        engine.stop()


if __name__ == "__main__":
    sys.exit(main())
