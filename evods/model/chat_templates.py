"""The chat formats evods trains and serves, by name: the one definition of each.

    internlm    InternLM v1:    <s><|System|>:{system}\\n<|User|>:{query}<eoh>\\n<|Bot|>:{reply}<eoa>\\n
    internlm2   InternLM2's ChatML: <s><|im_start|>{role}\\n{content}<|im_end|>\\n
    llama3      Llama-3:        <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>

Each `ChatTemplate` is a Jinja chat template, rendered by transformers' `apply_chat_template`, and the token that ends
an assistant turn. Everything that formats a conversation uses it: tools/chat_tokenizer.py (training data, with the
assistant turns and their end token as the only labels), `model.chat` / `stream_chat` / `build_inputs` (and so
tools/chat.py and tools/web_demo.py), and the exporter, which writes the template into `tokenizer_config.json` and the
end token into `generation_config.json`'s EOS ids. A model's config names its template (`chat_template` in
`config.json`), so that training data, chat and serving cannot use different formats.

This file is remote code of exported folders too (modeling_internlm.py imports it; `save_pretrained` copies both), so
that `model.chat` works where evods is not installed: it imports only the standard library.
"""
from collections.abc import Sequence
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    jinja: str  # the chat_template of tokenizer_config.json; the BOS token comes from it (rendered `bos_token`)
    end_of_turn: str  # ends an assistant turn: trained with the reply, and a stop token of generation
    special_tokens: tuple[str, ...]  # what the tokenizer must encode as one token each
    source: str  # whose format this is


def _jinja(family: str, turns: dict[str, tuple[str, str]], generation_prompt: str,
           content: str = "message['content']") -> str:
    """A Jinja chat template: BOS, then each message as its role's (prefix, suffix) around `content`, then, when asked
    for, the generation prompt; a role not in `turns` is refused."""
    branches = "{% el".join(f"if message['role'] == {role!r} %}}{{{{ {prefix!r} + {content} + {suffix!r} }}}}"
                            for role, (prefix, suffix) in turns.items())
    *others, last = turns
    roles = f"{', '.join(others)} and {last}" if others else last
    return ("{{ bos_token }}{% for message in messages %}{% " + branches + "{% else %}"
            "{{ raise_exception('" + family + " chat roles are " + roles + ", not ' + message['role']) }}"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ " + repr(generation_prompt) + " }}{% endif %}")


INTERNLM = ChatTemplate(
    name="internlm",
    # InternLM's chat format as InternLM's own HF code builds it (InternLM/InternLM, commit b9c813a,
    # tools/transformers/internlm_model/modeling_internlm.py, `build_inputs`, BOS added by its tokenizer) and as
    # InternEvo's tools/alpaca_tokenizer.py trains it; a system message as InternEvo's later `build_inputs`
    # (`meta_instruction`) writes it.
    jinja=_jinja("InternLM", {"system": ("<|System|>:", "\n"), "user": ("<|User|>:", "<eoh>\n"),
                              "assistant": ("<|Bot|>:", "<eoa>\n")}, "<|Bot|>:"),
    end_of_turn="<eoa>",
    special_tokens=("<eoh>", "<eoa>"),
    source="InternLM v1 (InternLM-chat-7b, InternEvo's SFT tools)",
)

INTERNLM2 = ChatTemplate(
    name="internlm2",
    # InternLM2-chat's ChatML (InternLM's chat/chat_format.md; InternEvo's transformers/internlm2_model
    # `build_inputs`, BOS added by its tokenizer).
    jinja=_jinja("InternLM2", {role: (f"<|im_start|>{role}\n", "<|im_end|>\n") for role in ROLES},
                 "<|im_start|>assistant\n"),
    end_of_turn="<|im_end|>",
    special_tokens=("<|im_start|>", "<|im_end|>"),
    source="InternLM2-chat (ChatML)",
)

LLAMA3 = ChatTemplate(
    name="llama3",
    # Meta's Llama-3 chat format (meta-llama/llama3, llama/tokenizer.py, `ChatFormat`): contents stripped, as
    # Meta-Llama-3-8B-Instruct's own chat_template does with `| trim`.
    jinja=_jinja("Llama-3", {role: (f"<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>")
                             for role in ROLES}, "<|start_header_id|>assistant<|end_header_id|>\n\n",
                 content="message['content'] | trim"),
    end_of_turn="<|eot_id|>",
    special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    source="Llama-3-Instruct",
)

CHAT_TEMPLATES = {template.name: template for template in (INTERNLM, INTERNLM2, LLAMA3)}
DEFAULT_CHAT_TEMPLATE = "internlm"  # InternLM v1 models, and configs written before templates had names


def chat_template_named(name: str) -> ChatTemplate:
    if name not in CHAT_TEMPLATES:
        raise ValueError(f"chat template {name!r} is not one of {', '.join(CHAT_TEMPLATES)}")
    return CHAT_TEMPLATES[name]


def tokens_missing(template: ChatTemplate, tokenizer) -> list[str]:
    """The template's special tokens that `tokenizer` (a transformers tokenizer) does not encode as one token."""
    return [token for token in template.special_tokens
            if len(tokenizer.encode(token, add_special_tokens=False)) != 1]


def check_tokenizer(template: ChatTemplate, tokenizer, tokenizer_name: str = "the tokenizer") -> None:
    """A ValueError naming the tokens when `tokenizer` cannot encode `template`'s format."""
    missing = tokens_missing(template, tokenizer)
    if missing:
        raise ValueError(f"{tokenizer_name} has no {', '.join(missing)} token(s), which the {template.name!r} chat "
                         f"template needs; use that model family's tokenizer, or the template of this tokenizer's "
                         f"family")


def stop_token_ids(template: ChatTemplate, tokenizer) -> list[int]:
    """What ends a reply: EOS and the template's end of turn (the EOS ids of the exported generation_config.json)."""
    end_of_turn = tokenizer.convert_tokens_to_ids(template.end_of_turn)
    return list(dict.fromkeys([tokenizer.eos_token_id, end_of_turn]))


def chat_messages(query: str, history: Sequence[tuple[str, str]] = (), meta_instruction: str = "") -> list[dict]:
    """A system prompt, (query, reply) pairs and the new query as chat-template messages."""
    messages = [{"role": "system", "content": meta_instruction}] if meta_instruction else []
    for past_query, past_reply in history:
        messages += [{"role": "user", "content": past_query}, {"role": "assistant", "content": past_reply}]
    return [*messages, {"role": "user", "content": query}]
