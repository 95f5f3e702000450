"""Chat in the terminal with an InternLM Hugging Face folder (a tools/convert2hf.py export, or a published InternLM v1
model): the reply is printed as it is generated, the conversation is the model's chat format (the folder's, or
--chat_template), and the oldest turns are left out when the conversation outgrows the context.

    python tools/chat.py --model hf/my_model
    python tools/chat.py --model hf/my_model --rotary_type origin --temperature 0   # greedy, plain RoPE

In the chat: /reset forgets the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops the reply being written.
"""
import argparse
import signal
import sys
import threading

from evods.cli import run_cli
from evods.inference import DTYPE_NAMES, ROTARY_TYPES, ContextError, InferenceError, fit_turn
from evods.inference.display import escape_controls
from evods.model.modeling_internlm import StopOnEvent

USER, BOT = "User  >>> ", "Robot >>> "


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """The sampling options of tools/chat.py and tools/web_demo.py (InternLM's chat defaults)."""
    parser.add_argument("--temperature", type=float, default=0.8, help="0 decodes greedily (default 0.8)")
    parser.add_argument("--top_p", type=float, default=0.8)
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--repetition_penalty", type=float, default=1.0)
    parser.add_argument("--max_new_tokens", type=int, default=1024)


def add_model_options(parser: argparse.ArgumentParser, rotary_type: bool = True) -> None:
    """The options that load a folder (tools/chat.py, web_demo.py, eval_long_context.py; the last runs both RoPEs)."""
    parser.add_argument("--model", required=True, help="an InternLM HF folder (tools/convert2hf.py writes one)")
    if rotary_type:
        parser.add_argument("--rotary_type", choices=ROTARY_TYPES, default=None,
                            help="dynamic NTK RoPE or plain RoPE past max_position_embeddings (default: the folder's)")
    parser.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default="auto",
                        help="auto: the folder's dtype on CUDA, float32 on the CPU")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="run the tokenizer code a published InternLM folder ships (tokenization_internlm.py)")


def generation_kwargs(temperature: float, top_p: float, top_k: int, repetition_penalty: float) -> dict:
    """chat()'s sampling arguments; temperature 0 means greedy."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or repetition_penalty <= 0:
        raise InferenceError("give --temperature >= 0, 0 < --top_p <= 1, --top_k >= 0, --repetition_penalty > 0")
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if temperature > 0 \
        else dict(do_sample=False)
    return {**sampling, "repetition_penalty": repetition_penalty}


def chat_parser(description: str, max_context_help: str) -> argparse.ArgumentParser:
    """The options tools/chat.py and tools/web_demo.py share: the folder, sampling, and the context's size."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    add_generation_options(parser)
    parser.add_argument("--max_context", type=int, default=None, help=max_context_help)
    # Checked when the model loads (one line naming the choices): the registry's import would load transformers
    # before --help could print.
    parser.add_argument("--chat_template", default=None,
                        help="the chat format: internlm, internlm2 or llama3 (evods.model.chat_templates; default: "
                             "the folder's, chat_template in config.json)")
    return parser


def main(argv=None) -> int:
    parser = chat_parser(__doc__, "tokens of prompt and reply with dynamic NTK (default 4 x max_position_embeddings); "
                                  "with origin RoPE the context is max_position_embeddings")
    args = parser.parse_args(argv)
    return run_cli(lambda: chat(args), (InferenceError, OSError))


def context_with_hint(config, max_context: int | None) -> tuple[int, str]:
    """(tokens the conversation may fill, what to do when a prompt alone is longer)."""
    from evods.inference.loading import context_limit, uses_dynamic_ntk

    limit = context_limit(config, max_context)
    if not uses_dynamic_ntk(config):
        return limit, "max_position_embeddings with origin RoPE; shorten it, or use --rotary_type dynamic"
    return limit, f"--max_context with dynamic NTK; shorten it, or raise --max_context (now {limit})"


def chat(args) -> None:
    sampling = generation_kwargs(args.temperature, args.top_p, args.top_k, args.repetition_penalty)
    if args.max_new_tokens < 1 or (args.max_context is not None and args.max_context < 2):
        raise InferenceError("give --max_new_tokens >= 1 and --max_context >= 2")
    from evods.cli.model_folder import check_not_a_training_checkpoint
    from evods.inference.loading import load_for_inference  # torch and transformers: after the options are read

    check_not_a_training_checkpoint(args.model)
    model, tokenizer = load_for_inference(args.model, args.rotary_type, args.dtype, args.device,
                                          args.trust_remote_code, args.chat_template)
    limit, too_long = context_with_hint(model.config, args.max_context)
    rotary = model.config.rotary["type"]
    print(f"Chatting with {args.model} ({model.config.num_hidden_layers} layers, {rotary} RoPE, "
          f"{model.config.chat_template} chat format, "
          f"max_position_embeddings {model.config.max_position_embeddings}, context {limit} tokens, "
          f"{model.dtype} on {model.device}).\n/reset forgets the conversation, /exit quits, Ctrl-C stops a reply.")
    history: list[tuple[str, str]] = []
    while True:
        try:
            query = input(USER).strip()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D quits)")
            continue
        if query == "/exit":
            return
        if query == "/reset":
            history = []
            print("(conversation forgotten)")
            continue
        if not query:
            continue
        try:
            turn = fit_turn(model, tokenizer, query, history, limit, args.max_new_tokens)
        except ContextError as error:
            print(f"{error} ({too_long})", file=sys.stderr)
            continue
        if turn.dropped:
            print(f"(the {turn.dropped} oldest turn(s) left out to fit the context of {limit} tokens)")
        reply = stream_reply(model, tokenizer, query, turn, sampling)
        if reply is not None:
            history = [*turn.history, (query, reply)]


def stream_reply(model, tokenizer, query: str, turn, sampling: dict) -> str | None:
    """Print the reply as it grows, control characters escaped; None when Ctrl-C stopped it (the turn is then not
    remembered). The history keeps the reply as the model wrote it.

    While the reply is written, Ctrl-C only sets an event that generation checks after each token: a
    KeyboardInterrupt raised into the wait on the streamer's queue could leave its lock with the wrong thread and
    stall both threads."""
    print(BOT, end="", flush=True)
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    try:
        replies = model.stream_chat(tokenizer, query, turn.history, max_new_tokens=turn.max_new_tokens,
                                    stopping_criteria=[StopOnEvent(stop)], **sampling)
        printed = ""
        for reply, _ in replies:
            if stop.is_set():
                break
            if reply.startswith(printed):
                print(escape_controls(reply[len(printed):]), end="", flush=True)
                printed = reply
        replies.close()  # the generation thread has ended when this returns
    finally:
        signal.signal(signal.SIGINT, previous)
    if stop.is_set():
        print("\n(stopped)")
        return None
    print()
    return printed


if __name__ == "__main__":
    sys.exit(main())
