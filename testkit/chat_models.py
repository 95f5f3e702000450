"""Tiny random InternLM folders with the real tokenizer, as tools/convert2hf.py writes them, for the inference tests
(chat, streaming, the terminal chat, the web demo, the long-context evaluation, the server) and the export tests."""
from pathlib import Path

import torch

from evods.checkpoint.formats.hf import write_generation_config
from evods.checkpoint.formats.hf_tokenizer import write_tokenizer
from evods.model import InternLMConfig, InternLMForCausalLM
from evods.model.chat_templates import INTERNLM
from testkit.paths import TOKENIZER

# The tokenizer's vocabulary, so that text round-trips; small layers, so that a token takes milliseconds.
TINY = dict(vocab_size=103168, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, rotary={"base": 10000, "type": "dynamic"})


def tiny_model(seed: int = 0, **overrides) -> InternLMForCausalLM:
    torch.manual_seed(seed)
    return InternLMForCausalLM(InternLMConfig(**{**TINY, **overrides})).eval()


def tiny_chat_folder(folder: Path, seed: int = 0, **overrides) -> Path:
    """An HF folder (weights, config, InternLM's tokenizer files with the chat template) of a random tiny model."""
    model = tiny_model(seed, **overrides)
    model.save_pretrained(folder)
    write_tokenizer(str(TOKENIZER), str(folder), model.config.max_position_embeddings, INTERNLM)
    write_generation_config(str(folder), INTERNLM)
    return folder


def scripted_chat_folder(folder: Path, reply: str) -> Path:
    """An HF folder whose greedy chat reply to any query is exactly `reply`, then `<eoa>`: a bigram model (attention
    and MLPs output zero, so each next token depends on the last one only) in which the prompt's last token
    (`>:` of `<|Bot|>:`) leads to the reply's first token, each reply token to the next, and the last one to
    `<eoa>`. For the tests of what the tools show of a reply (control characters)."""
    from transformers import AutoTokenizer

    model = tiny_model()
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(str(TOKENIZER), str(folder), model.config.max_position_embeddings, INTERNLM)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reply_ids = tokenizer(reply, add_special_tokens=False).input_ids
    assert tokenizer.decode(reply_ids) == reply, "the reply must round-trip through the tokenizer"
    prompt_end = model.build_inputs(tokenizer, "any query")["input_ids"][0, -1].item()
    chain = [prompt_end, *reply_ids, tokenizer.convert_tokens_to_ids("<eoa>")]
    sources = chain[:-1]
    assert len(set(sources)) == len(sources) <= model.config.hidden_size, "each token may lead to one next token"
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.fill_(1.0 if name.endswith("norm.weight") else 0.0)
        for position, token in enumerate(sources):  # token -> a direction of its own -> the next token's logit
            model.model.embed_tokens.weight[token, position] = 1.0
            model.lm_head.weight[chain[position + 1], position] = 10.0
    model.save_pretrained(folder)
    return folder


# Llama-3's special tokens, after the vocabulary as in Meta's tokenizer (ids 128000 on there).
LLAMA3_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>")


def llama3_tokenizer_folder(folder: Path, chat_template: str | None = None, vocab_size: int = 2000) -> Path:
    """A small tokenizer in Llama-3's form (byte-level BPE, its special tokens after the vocabulary, BOS
    <|begin_of_text|> added, EOS <|end_of_text|> as the base model's), trained on the shipped samples: the tests'
    stand-in for Meta's tokenizer, whose licence keeps it out of the repo. `chat_template`: the folder's own, if any."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from testkit.paths import DATA

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    texts = [path.read_text(encoding="utf-8") for path in sorted((DATA / "chat").iterdir())]
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer.add_special_tokens(list(LLAMA3_SPECIAL_TOKENS))
    bos = LLAMA3_SPECIAL_TOKENS[0]
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                             special_tokens=[(bos, tokenizer.token_to_id(bos))])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": LLAMA3_SPECIAL_TOKENS[1],
              "clean_up_tokenization_spaces": False, "model_max_length": 8192,
              **({"chat_template": chat_template} if chat_template is not None else {})}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def tiny_export(root: Path, model_dict: dict, *convert2hf_args: str, seed: int = 0, name: str = "hf",
                tokenizer: Path = TOKENIZER) -> Path:
    """root/`name`: tools/convert2hf.py's folder (with `tokenizer`) of a random tiny InternLM written as an InternEvo
    native checkpoint (root/native, tensor-parallel 2, made on the first call) with InternEvo's `model` dict
    `model_dict`. The weights are large enough (std 0.3) that logits differ clearly between tokens."""
    from evods.checkpoint.formats.internevo import write_native_checkpoint
    from evods.checkpoint.formats.internevo_layout import NativeLayout
    from evods.model import config_from_model_dict
    from tools.convert2hf import main as convert2hf

    if not (root / "native").exists():
        torch.manual_seed(seed)
        model = InternLMForCausalLM(config_from_model_dict(model_dict))
        with torch.no_grad():
            for parameter_name, param in model.named_parameters():
                param.normal_(1.0 if "norm" in parameter_name else 0.0, 0.3)
        write_native_checkpoint(str(root / "native"), model.state_dict(), model_dict,
                                NativeLayout(tp=2, pp=1, num_layers=model_dict["num_layers"]), step=1)
    code = convert2hf(["--src", str(root / "native"), "--tgt", str(root / name), "--tokenizer", str(tokenizer),
                       *convert2hf_args])
    assert code == 0, f"convert2hf exited with {code}"
    return root / name
