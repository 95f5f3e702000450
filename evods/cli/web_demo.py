"""The quickstart's web demo: chat with an InternLM Hugging Face folder in the browser, with streamed replies, the
generation settings, a dynamic NTK RoPE switch (it applies to the next reply, without reloading the model), a box for
a long document to ask about, and the context's token count.

    pip install -e .[web]     # Gradio, once
    python tools/web_demo.py --model hf/my_model      # then open http://127.0.0.1:7860

It serves 127.0.0.1 only, unless --host says otherwise; nothing on the page is fetched from the internet.
"""
import os
import sys
import time

from evods.cli import run_cli
from evods.cli.chat import chat_parser, generation_kwargs
from evods.inference import ContextError, InferenceError, fit_turn
from evods.inference.display import escape_controls

# Before gradio is imported: no usage statistics or version check over the network (the page must work offline).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def main(argv=None) -> int:
    parser = chat_parser(__doc__, "tokens of prompt and reply, with either RoPE (default 4 x max_position_embeddings, "
                                  "so that origin RoPE can be compared past its positions)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any free port)")
    args = parser.parse_args(argv)
    return run_cli(lambda: serve(args), (InferenceError, OSError))


def serve(args) -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise InferenceError("the web demo needs Gradio: pip install -e .[web]  (or pip install 'evods[web]')") \
            from None
    generation_kwargs(args.temperature, args.top_p, args.top_k, args.repetition_penalty)  # checks the values
    from evods.cli.model_folder import check_not_a_training_checkpoint
    from evods.inference.loading import load_for_inference

    check_not_a_training_checkpoint(args.model)
    model, tokenizer = load_for_inference(args.model, args.rotary_type, args.dtype, args.device,
                                          args.trust_remote_code, args.chat_template)
    demo = build_demo(model, tokenizer, args)
    port = args.port or free_port(args.host)
    print(f"evods web demo of {args.model}: http://{args.host}:{port}", flush=True)
    demo.queue().launch(server_name=args.host, server_port=port, share=False, inbrowser=False, ssr_mode=False,
                        footer_links=[], theme=theme(), css=CSS)


def free_port(host: str) -> int:
    import socket

    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def theme():
    """Gradio's default theme with the fonts it ships (a Google font would be fetched from the internet)."""
    import gradio as gr

    return gr.themes.Default(font=[gr.themes.LocalFont("Source Sans Pro"), "ui-sans-serif", "sans-serif"],
                             font_mono=[gr.themes.LocalFont("IBM Plex Mono"), "ui-monospace", "monospace"])


CSS = "#context, #status {font-size: 0.9em}"


def context_line(model, tokenizer, limit: int, history, document: str) -> str:
    """The context in use, and what the model was trained with: the packed row length train_ds.py records in the
    export (the longest context it saw), and where dynamic NTK starts to rescale (max_position_embeddings)."""
    used = model.build_inputs(tokenizer, "", history)["input_ids"].shape[1] if history else 0
    pending = f" + {count_tokens(tokenizer, document)} in the document box" if document.strip() else ""
    trained = getattr(model.config, "training_packed_length", None)
    trained = (f"the model was trained on rows of {trained} tokens (packed length)" if trained else
               "the folder does not say what length the model was trained on")
    return (f"**Context:** {used} tokens in the conversation{pending}; {trained}; dynamic NTK RoPE rescales past "
            f"{model.config.max_position_embeddings} positions (max_position_embeddings); this demo keeps at most "
            f"{limit}.")


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids) if text else 0


STOPPED = "stopped: this reply is not kept in the conversation (the model will not see it)"


def build_demo(model, tokenizer, args):
    import gradio as gr

    positions = model.config.max_position_embeddings
    limit = args.max_context or 4 * positions

    def context(history, document: str) -> str:
        return context_line(model, tokenizer, limit, history, document)

    def respond(question, document, display, history, dynamic, max_new_tokens, temperature, top_p, top_k,
                repetition_penalty):
        """Stream a reply into the chat. The question and document boxes are emptied once, when the question is
        taken; later updates leave them alone, so that what is typed meanwhile stays."""
        question, document = question.strip(), document.strip()
        if not question:
            raise gr.Error("Type a question first.")
        rotary = "dynamic" if dynamic else "origin"
        model.set_rotary_type(rotary)  # for this reply and the next ones, until switched again
        query = f"{document}\n\n{question}" if document else question
        try:
            sampling = generation_kwargs(temperature, top_p, int(top_k), repetition_penalty)
            turn = fit_turn(model, tokenizer, query, history, limit, int(max_new_tokens))
        except (ContextError, InferenceError) as error:
            raise gr.Error(f"{error}: shorten the document, or start again with Clear.") from None
        shown = f"[document, {count_tokens(tokenizer, document)} tokens]\n\n{question}" if document else question
        display = [*display, {"role": "user", "content": escape_controls(shown)},
                   {"role": "assistant", "content": ""}]
        label = "dynamic NTK RoPE" if dynamic else "origin RoPE"
        dropped = f" ({turn.dropped} oldest turn(s) left out to fit)" if turn.dropped else ""
        status = f"generating with {label} from a {turn.prompt_tokens}-token prompt{dropped}…"
        start, reply = time.perf_counter(), ""
        yield display, gr.skip(), "", "", status, context(history, "")
        for reply, _ in model.stream_chat(tokenizer, query, turn.history, max_new_tokens=turn.max_new_tokens,
                                          **sampling):
            display[-1] = {"role": "assistant", "content": escape_controls(reply)}
            yield display, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        history = [*turn.history, (query, reply)]
        seconds = time.perf_counter() - start
        status = (f"done with {label}: a {count_tokens(tokenizer, reply)}-token reply to a {turn.prompt_tokens}-token "
                  f"prompt in {seconds:.1f} s{dropped}")
        yield display, history, gr.skip(), gr.skip(), status, context(history, "")

    with gr.Blocks(title="evods chat", analytics_enabled=False) as demo:
        gr.Markdown(f"### evods chat: `{args.model}`")
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=480, render_markdown=False,
                                     feedback_options=None, buttons=["copy", "copy_all"])
                # One line that grows: Gradio sends a one-line box on Enter and breaks the line on Shift+Enter (a
                # box of several lines does the opposite).
                question = gr.Textbox(label="Your question", elem_id="question", lines=1, max_lines=8,
                                      placeholder="Ask something (Enter sends, Shift+Enter for a new line)")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    stop = gr.Button("Stop", elem_id="stop")
                    clear = gr.Button("Clear", elem_id="clear")
                status = gr.Markdown("", elem_id="status")
                context_box = gr.Markdown(context([], ""), elem_id="context")
            with gr.Column(scale=2):
                dynamic = gr.Checkbox(model.config.rotary["type"] == "dynamic", label="Dynamic NTK RoPE",
                                      elem_id="dynamic_ntk",
                                      info=f"Past {positions} tokens: on, the RoPE base grows with the length "
                                           "(dynamic NTK); off, plain RoPE. Applies to the next reply.")
                document = gr.Textbox(label="Long document (sent before your next question)", lines=8,
                                      max_lines=16, elem_id="document")
                with gr.Accordion("Generation settings", open=False):
                    max_new_tokens = gr.Slider(1, limit, value=min(args.max_new_tokens, limit), step=1,
                                               label="max new tokens", elem_id="max_new_tokens")
                    temperature = gr.Slider(0, 2, value=args.temperature, step=0.05, label="temperature (0: greedy)")
                    top_p = gr.Slider(0.05, 1, value=args.top_p, step=0.05, label="top p")
                    top_k = gr.Slider(0, 200, value=args.top_k, step=1, label="top k (0: off)")
                    repetition_penalty = gr.Slider(0.5, 2, value=args.repetition_penalty, step=0.05,
                                                   label="repetition penalty")
        inputs = [question, document, chatbot, history, dynamic, max_new_tokens, temperature, top_p, top_k,
                  repetition_penalty]
        # No progress overlay on the outputs: it would cover the question box while a reply streams. One reply at a
        # time ("once"): Enter or Send during a reply does nothing.
        reply = gr.on([send.click, question.submit], respond, inputs,
                      [chatbot, history, question, document, status, context_box], show_progress="hidden",
                      trigger_mode="once")
        # Stop and Clear first cancel a running reply, then change the page: an update of the reply that was on its
        # way would otherwise land after Clear and fill the chat again (the queue keeps the order of the updates).
        stop.click(None, cancels=[reply]).then(lambda: STOPPED, None, status)
        document.change(lambda text, past: context(past, text), [document, history], context_box,
                        show_progress="hidden")
        clear.click(None, cancels=[reply]).then(lambda: ([], [], "", "", context([], "")), None,
                                                [chatbot, history, question, status, context_box])
        chatbot.clear(None, cancels=[reply]).then(lambda: ([], "", context([], "")), None,  # its bin icon
                                                  [history, status, context_box])
    return demo


if __name__ == "__main__":
    sys.exit(main())
