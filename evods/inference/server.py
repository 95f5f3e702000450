"""An OpenAI-compatible HTTP endpoint on an exported folder (`evods-serve`, tools/serve.py): `/v1/models`,
`/v1/chat/completions` and `/v1/completions`, streamed as server-sent events or not, with the folder's own chat
template and end-of-reply ids (`tokenizer_config.json`'s `chat_template`, `generation_config.json`'s
`eos_token_id`) and its RoPE as exported (dynamic NTK included).

Why not `transformers serve`: transformers 5.24's loads a model with `getattr(transformers, architectures[0])`, so
a folder whose model class comes with the folder (InternLM's) does not load at all, `--trust-remote-code` or not
("module transformers has no attribute InternLMForCausalLM"); it also answers an unknown model name with 400 and
malformed JSON with 422, checks no context length, has no API key, and seeds the shared random generator when a
request arrives rather than when its generation runs. Its building blocks are internal to its CLI and change from
release to release. So this is a small FastAPI app around the model's own `generate`.

Requests wait in one queue for one generation thread: a model on one device runs one request at a time, so
concurrent clients are all answered, in arrival order, each with its own seed and settings.
"""
import asyncio
import hmac
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from transformers.generation.streamers import BaseStreamer

from evods.model.modeling_internlm import StopOnEvent

logger = logging.getLogger("evods.serve")

# Fields of OpenAI's API that would change the answer and that this server does not implement: a request that sets
# one is refused (400) rather than answered as if it had not.
UNSUPPORTED = ("logprobs", "top_logprobs", "logit_bias", "tools", "tool_choice", "functions", "function_call",
               "response_format", "echo", "suffix", "audio", "modalities", "prediction")


class RequestError(Exception):
    """A request the server refuses: HTTP `status` and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(self.status, "invalid_request_error")
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """What both endpoints take. Other fields of OpenAI's API that do not change the text (`user`, `metadata`, ...)
    are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0
    frequency_penalty: float = 0
    best_of: int | None = None
    # beyond OpenAI's API, as vLLM takes them (the openai client's `extra_body`)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False

    def check_supported(self) -> None:
        extra = self.model_extra or {}
        for name in UNSUPPORTED:
            if extra.get(name) not in (None, False, [], {}):
                raise RequestError(400, f"{name} is not supported by evods-serve", param=name)
        if self.n != 1 or self.best_of not in (None, 1):
            raise RequestError(400, "one choice per request (n = 1); send several requests, they are queued",
                               param="n")
        if self.presence_penalty or self.frequency_penalty:
            raise RequestError(400, "presence_penalty and frequency_penalty are not supported; use "
                                    "repetition_penalty (e.g. 1.1)", param="frequency_penalty")

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not stop for stop in stops):
            raise RequestError(400, "stop strings must not be empty", param="stop")
        return stops


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        """The content; a list of parts is joined (text parts only)."""
        if not isinstance(self.content, list):
            return self.content or ""
        if any(part.get("type") != "text" for part in self.content):
            raise RequestError(400, "only text content parts are supported", param="messages")
        return "".join(str(part.get("text", "")) for part in self.content)


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int]


@dataclass
class Job:
    """One request's generation: its prompt, `generate` arguments, stop strings and where the text goes (an asyncio
    queue of ("text", str), then ("end", usage and finish reason) or ("error", message))."""

    prompt_ids: list[int]
    generate_kwargs: dict
    stop: list[str]
    seed: int | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    halt: threading.Event = field(default_factory=threading.Event)  # a stop string was met, or the client left

    def send(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class IncrementalDecoder:
    """The text each new token adds. A token's text can depend on its neighbours (SentencePiece's leading "▁", a
    character split over byte tokens), so the text is the difference of two decodes of a short window, as vLLM and
    TGI do; tokenizers' `DecodeStream` does the same for fast tokenizers only."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] decoded to the text already given out

    def step(self, token: int | None, final: bool = False) -> str:
        if token is not None:
            self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if (after.endswith("\ufffd") and not final) or len(after) <= len(before):
            return ""  # an incomplete character, or nothing visible yet
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]


class StopStrings:
    """OpenAI's `stop`: the reply ends before the first stop string, which is not part of it. Text that could be
    the start of a stop string is held back until the next tokens tell."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending = stops, ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text that is safe to give out, whether a stop string was met)."""
        self.pending += text
        found = [index for index in (self.pending.find(stop) for stop in self.stops) if index >= 0]
        if found:
            out, self.pending = self.pending[:min(found)], ""
            return out, True
        held = max((size for stop in self.stops for size in range(1, len(stop))
                    if self.pending.endswith(stop[:size])), default=0)
        out, self.pending = self.pending[:len(self.pending) - held], self.pending[len(self.pending) - held:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class ReplyStreamer(BaseStreamer):
    """`generate`'s streamer for one job: the reply's text as it grows, up to an end-of-reply id or a stop string."""

    def __init__(self, job: Job, tokenizer, stop_ids: set[int]):
        self.job, self.stop_ids = job, stop_ids
        self.decoder, self.stops = IncrementalDecoder(tokenizer), StopStrings(job.stop)
        self.prompt_seen, self.finished = False, False
        self.tokens, self.finish_reason = 0, "length"

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate's first call passes the prompt
            self.prompt_seen = True
            return
        for token in value.view(-1).tolist():
            if self.finished:
                return
            self.tokens += 1
            if token in self.stop_ids:
                self.flush()
                self.finish("stop")
            else:
                self.give_out(self.decoder.step(token))

    def give_out(self, text: str) -> bool:
        """Send what the stop strings let through; whether one was met."""
        out, hit = self.stops.feed(text)
        if out:
            self.job.send("text", out)
        if hit:
            self.finish("stop")
        return hit

    def flush(self) -> None:
        """The reply ends here: the text held back belongs to it."""
        if not self.give_out(self.decoder.step(None, final=True)):
            rest = self.stops.flush()
            if rest:
                self.job.send("text", rest)

    def finish(self, reason: str) -> None:
        self.finished, self.finish_reason = True, reason
        self.job.halt.set()  # generate stops after this token

    def end(self) -> None:
        if not self.finished:  # max_tokens reached
            self.flush()


class Engine:
    """The model, its tokenizer, the limits, and the thread that runs `generate` for one job after another."""

    def __init__(self, model, tokenizer, name: str, context: int):
        self.model, self.tokenizer, self.name, self.context = model, tokenizer, name, context
        eos = model.generation_config.eos_token_id
        self.stop_ids = [eos] if isinstance(eos, int) else list(eos or [tokenizer.eos_token_id])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        # the folder's sampling defaults where its generation_config.json sets them (as vLLM), else OpenAI's
        folder = model.generation_config.to_diff_dict()
        self.defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0,
                         **{key: folder[key] for key in ("temperature", "top_p", "top_k", "repetition_penalty")
                            if folder.get(key) is not None}}
        self.created = int(time.time())
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self.run_jobs, name="generate", daemon=True)
        self.thread.start()

    def check_model(self, name: str) -> None:
        if name != self.name:
            raise RequestError(404, f"the model {name!r} does not exist; this server serves {self.name!r} "
                                    "(GET /v1/models)", param="model", code="model_not_found")

    def chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        """The folder's chat template applied; its text tokenized without added special tokens (the template has
        them), as the model's own `chat` does."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(400, "this model's folder has no chat template (tokenizer_config.json chat_template): "
                                    "use /v1/completions, or export with --tokenizer", param="messages")
        conversation = [{"role": message.role, "content": message.text()} for message in messages]
        try:
            text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # jinja's TemplateError, or the template's own raise_exception
            raise RequestError(400, f"the chat template rejects these messages: {error}", param="messages") \
                from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_prompt(self, prompt: str | list[str] | list[int]) -> list[int]:
        if isinstance(prompt, list) and all(isinstance(token, int) for token in prompt) and prompt:
            if any(not 0 <= token < self.model.config.vocab_size for token in prompt):
                raise RequestError(400, f"token ids must lie in 0..{self.model.config.vocab_size - 1}",
                                   param="prompt")
            return prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise RequestError(400, "one prompt per request; send several requests, they are queued",
                                   param="prompt")
            prompt = prompt[0]
        return self.tokenizer(prompt)["input_ids"]  # BOS first where the tokenizer adds it, as `generate` expects

    def job(self, request: GenerationRequest, prompt_ids: list[int], max_tokens: int | None) -> Job:
        """The request's job, with its arguments checked against the context."""
        request.check_supported()
        room = self.context - len(prompt_ids)
        if room < 1:
            raise RequestError(400, f"this model's context is {self.context} tokens and the prompt has "
                                    f"{len(prompt_ids)}: shorten the prompt", code="context_length_exceeded")
        if max_tokens and max_tokens > room:
            raise RequestError(400, f"this model's context is {self.context} tokens; the prompt has {len(prompt_ids)} "
                                    f"and max_tokens asks for {max_tokens} more: lower max_tokens to {room} or "
                                    "shorten the prompt", param="max_tokens", code="context_length_exceeded")
        wanted = max_tokens or room
        sampling = {key: getattr(request, key) if getattr(request, key) is not None else default
                    for key, default in self.defaults.items()}
        kwargs = {"max_new_tokens": wanted, "pad_token_id": self.pad_id,
                  "eos_token_id": None if request.ignore_eos else self.stop_ids,
                  "repetition_penalty": sampling["repetition_penalty"]}
        if sampling["temperature"] > 0:
            kwargs.update(do_sample=True, temperature=sampling["temperature"], top_p=sampling["top_p"],
                          top_k=sampling["top_k"])
        else:
            kwargs["do_sample"] = False
        return Job(prompt_ids, kwargs, request.stop_strings(), request.seed, asyncio.get_running_loop())

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def run_jobs(self) -> None:
        while (job := self.jobs.get()) is not None:
            self.run(job)

    def run(self, job: Job) -> None:
        if job.halt.is_set():  # its client left while it waited
            return
        streamer = ReplyStreamer(job, self.tokenizer, set() if job.generate_kwargs["eos_token_id"] is None
                                 else set(self.stop_ids))
        try:
            if job.seed is not None:
                torch.manual_seed(job.seed)  # here, not on arrival: the jobs before it draw from the generator too
            input_ids = torch.tensor([job.prompt_ids], device=self.model.device)
            with torch.no_grad():
                self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                                    stopping_criteria=[StopOnEvent(job.halt)], **job.generate_kwargs)
        except Exception as error:  # the request fails; the server goes on with the next
            logger.exception("generation failed")
            job.send("error", f"generation failed: {type(error).__name__}: {error}")
            return
        job.send("end", {"finish_reason": streamer.finish_reason,
                         "usage": usage(len(job.prompt_ids), streamer.tokens)})

    def stop(self) -> None:
        self.jobs.put(None)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class ReplyFormat:
    """How one endpoint's objects look: a chat message or a text completion."""

    chat: bool
    model: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def envelope(self, choice: dict, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        return {"id": prefix + self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": [{"index": 0, **choice}]}

    def whole(self, text: str, end: dict) -> dict:
        content = {"message": {"role": "assistant", "content": text}} if self.chat \
            else {"text": text, "logprobs": None}
        return {**self.envelope({**content, "finish_reason": end["finish_reason"]}, chunk=False),
                "usage": end["usage"]}

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            return self.envelope({"delta": delta, "logprobs": None, "finish_reason": finish_reason}, chunk=True)
        return self.envelope({"text": text or "", "logprobs": None, "finish_reason": finish_reason}, chunk=True)

    def usage_chunk(self, end: dict) -> dict:
        return {**self.envelope({}, chunk=True), "choices": [], "usage": end["usage"]}


def server_sent(event: dict | str) -> str:
    return f"data: {event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)}\n\n"


async def reply(engine: Engine, job: Job, form: ReplyFormat, stream: bool, include_usage: bool):
    engine.submit(job)
    if stream:
        return StreamingResponse(stream_events(job, form, include_usage), media_type="text/event-stream")
    try:
        parts = []
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                parts.append(value)
            elif kind == "error":
                raise RequestError(500, value, code="generation_failed")
            else:
                return JSONResponse(form.whole("".join(parts), value))
    finally:
        job.halt.set()  # a cancelled request (its client left) ends its generation at the next token


async def stream_events(job: Job, form: ReplyFormat, include_usage: bool) -> AsyncIterator[str]:
    try:
        if form.chat:
            yield server_sent(form.chunk(None, role=True))
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                yield server_sent(form.chunk(value))
            elif kind == "error":
                yield server_sent({"error": {"message": value, "type": "server_error", "code": "generation_failed"}})
                return
            else:
                yield server_sent(form.chunk(None, finish_reason=value["finish_reason"]))
                if include_usage:
                    yield server_sent(form.usage_chunk(value))
                yield server_sent("[DONE]")
                return
    finally:
        job.halt.set()  # a client that left stops its generation at the next token


def validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    """One line for pydantic's errors: malformed JSON, or the first field that is wrong."""
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    return f"{where or 'body'}: {first.get('msg')}", where or None


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    # no /docs page: it would load its scripts from a CDN
    app = FastAPI(title="evods-serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def refused(_request: Request, error: RequestError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError):
        message, param = validation_message(error)
        return RequestError(400, message, param=param).response()

    @app.exception_handler(Exception)
    async def failed(_request: Request, error: Exception):
        logger.exception("request failed")
        return RequestError(500, f"internal error: {type(error).__name__}: {error}").response()

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise RequestError(401, "a wrong or missing API key: send the header 'Authorization: Bearer KEY' (the "
                                    "openai client's api_key)", code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": engine.created,
                                            "owned_by": "evods", "max_model_len": engine.context}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(request: ChatRequest):
        engine.check_model(request.model)
        job = engine.job(request, engine.chat_prompt(request.messages),
                         request.max_completion_tokens or request.max_tokens)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return await reply(engine, job, ReplyFormat(True, engine.name), request.stream, include_usage)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(request: CompletionRequest):
        engine.check_model(request.model)
        job = engine.job(request, engine.text_prompt(request.prompt), request.max_tokens)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return await reply(engine, job, ReplyFormat(False, engine.name), request.stream, include_usage)

    return app
