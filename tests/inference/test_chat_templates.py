"""One chat template from the training data to the served model (issue: conversations as fine-tuning data). For each
template of evods.model.chat_templates, the ids tools/chat_tokenizer.py writes for a multi-turn conversation are the
exported folder's `apply_chat_template(messages)` under the installed transformers 5.x and under 4.36 without evods,
and exactly the replies and their end-of-turn tokens are trained; the templates render the published prompts; and a
model fine-tuned on the tool's data (InternLM2's ChatML, named in the training config) gives the same greedy tokens
through `model.chat` and through the exported folder's `apply_chat_template` + `generate`, with and without evods."""
import json
import re
from pathlib import Path

import pytest
import sentencepiece
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import evods  # noqa: F401  (registers the Auto classes)
from evods.inference import InferenceError, load_for_inference
from evods.model.chat_templates import CHAT_TEMPLATES
from testkit import compat_env
from testkit.chat_models import llama3_tokenizer_folder, tiny_export
from testkit.conversations import MESSAGES, SYSTEM, TURNS, samples, trained_runs
from testkit.distributed import run_distributed
from testkit.paths import REPO, TOKENIZER
from tools.chat_tokenizer import main as chat_tokenizer
from tools.convert2hf import main as convert2hf

torch.set_num_threads(1)

INTERNLM2_TOKENIZER = REPO / "tools" / "tokenizer_internlm2.model"
# Llama-3's published template: the chat_template of meta-llama/Meta-Llama-3-8B-Instruct's tokenizer_config.json on the
# Hugging Face Hub (April 2024 release), kept verbatim as the reference the llama3 template must render alike.
LLAMA3_PUBLISHED = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
HISTORY, QUERY = TURNS[:2], TURNS[2][0]
GREEDY = dict(do_sample=False, max_new_tokens=24)
# a tiny model per template: InternLM's and the Llama-3 stand-in's random, InternLM2's fine-tuned on the conversation
TINY = dict(hidden_size=64, num_layers=2, num_attention_heads=4, mlp_ratio=2, dtype=torch.float32)
FINE_TUNE_STEPS = 40

SERVE = compat_env.WITHOUT_EVODS + """
import json
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

spec, result = json.loads(sys.argv[1]), {"version": transformers.__version__}
# (to a file: transformers 5's AutoTokenizer prints a remote-code prompt for the folder's config on stdout)
as_list = lambda ids: list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # 5.x: a BatchEncoding
for name, folder in spec["folders"].items():
    entry = result[name] = {"eos": GenerationConfig.from_pretrained(folder).eos_token_id}
    for kind in spec["kinds"][name]:
        tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=kind == "fast")
        entry[kind] = as_list(tokenizer.apply_chat_template(spec["messages"]))
    entry["end_of_turn"] = tokenizer.convert_tokens_to_ids(spec["end_of_turn"][name])
folder = spec["folders"]["internlm2"]
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
prompt = torch.tensor([as_list(tokenizer.apply_chat_template(spec["prompt_messages"], add_generation_prompt=True))])
with torch.no_grad():
    result["generate"] = model.generate(prompt, **spec["greedy"])[0, prompt.shape[1]:].tolist()
    seen, generate = [], model.generate
    model.generate = lambda *args, **kwargs: seen.append(generate(*args, **kwargs)) or seen[-1]
    reply, _ = model.chat(tokenizer, spec["query"], spec["history"], meta_instruction=spec["system"], **spec["greedy"])
result["chat"] = {"reply": reply, "prompt": seen[0][0, :prompt.shape[1]].tolist(),
                  "new": seen[0][0, prompt.shape[1]:].tolist()}
json.dump(result, open(sys.argv[2], "w"))
"""


def fine_tune(train_folder: str, ckpt: str, run_dir: str) -> list[float]:
    """A tiny InternLM2-format model trained on the conversations of `train_folder`; its losses."""
    from evods.training.distributed import init_distributed
    from evods.training.trainer import Trainer
    from testkit.train_configs import tiny_config

    init_distributed("torch")
    config = tiny_config(
        data=dict(seq_len=128, micro_bsz=1, micro_num=1, total_steps=FINE_TUNE_STEPS, train_folder=train_folder),
        model=dict(**{k: v for k, v in TINY.items() if k != "dtype"}, vocab_size=92544, chat_template="internlm2"),
        adam=dict(lr=1e-2), lr_scheduler=dict(total_steps=FINE_TUNE_STEPS, warmup_ratio=0.1, eta_min=1e-3),
        ckpt=dict(enable_save_ckpt=True, save_ckpt_folder=f"local:{ckpt}", checkpoint_every=FINE_TUNE_STEPS))
    return [entry["loss"] for entry in Trainer(config, run_dir=Path(run_dir)).train().history]


def tool(source: Path, out: Path, template: str, copies: int = 1) -> list[int]:
    """The tokens tools/chat_tokenizer.py writes for the conversation (`copies` records of it)."""
    src = out.with_suffix(".jsonl")
    src.write_text((json.dumps({"messages": MESSAGES}, ensure_ascii=False) + "\n") * copies, encoding="utf-8")
    assert chat_tokenizer([str(src), str(out), "--tokenizer_path", str(source), "--template", template,
                           "--split_ratio", "0", "--quiet"]) == 0
    written = samples(out / "train" / "en" / f"{src.stem}.bin")
    assert len(written) == copies and all(tokens == written[0] for tokens in written)
    return written[0]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict:
    """{template: (the exported folder, the tool's tokens for the conversation)}: InternLM v1 by default (the
    checkpoint config's), InternLM2 named by the training config, Llama-3 by convert2hf's --chat_template (over the
    tokenizer folder's own, the published template)."""
    root = tmp_path_factory.mktemp("templates")
    llama3_source = llama3_tokenizer_folder(root / "llama3_tokenizer", chat_template=LLAMA3_PUBLISHED)
    internlm2_tokens = tool(INTERNLM2_TOKENIZER, root / "internlm2_data", "internlm2", copies=24)
    losses = run_distributed(fine_tune, 1, (str(root / "internlm2_data" / "train"), str(root / "ckpt"),
                                            str(root / "run")))[0]
    assert losses[-1] < 0.5 < 5 < losses[0]  # it learnt the conversation
    (root / "internlm2").mkdir()
    assert convert2hf(["--src", str(root / "ckpt" / str(FINE_TUNE_STEPS)), "--tgt", str(root / "internlm2" / "hf"),
                       "--tokenizer", str(INTERNLM2_TOKENIZER)]) == 0
    exported = {
        "internlm": (tiny_export(root / "internlm", dict(TINY, vocab_size=103168)),
                     tool(TOKENIZER, root / "data", "internlm")),
        "internlm2": (root / "internlm2" / "hf", internlm2_tokens),
        "llama3": (tiny_export(root / "llama3", dict(TINY, vocab_size=2048), "--chat_template", "llama3",
                               tokenizer=llama3_source), tool(llama3_source, root / "llama3_data", "llama3")),
    }
    compat_env.ensure()
    return exported


def serve(exports, version: str | None, tmp_path: Path) -> dict:
    spec = {"folders": {name: str(folder) for name, (folder, _) in exports.items()},
            # the slow tokenizers of the SentencePiece folders too; a tokenizer.json-only folder has none
            "kinds": {"internlm": ["fast", "slow"], "internlm2": ["fast", "slow"], "llama3": ["fast"]},
            "end_of_turn": {name: template.end_of_turn for name, template in CHAT_TEMPLATES.items()},
            "messages": MESSAGES, "prompt_messages": MESSAGES[:-1], "query": QUERY, "history": HISTORY,
            "system": SYSTEM, "greedy": GREEDY}
    run = compat_env.run(version, SERVE, json.dumps(spec, ensure_ascii=False), str(tmp_path / "served.json"),
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((tmp_path / "served.json").read_text())


@pytest.mark.parametrize("version", ["4.36.2", None], ids=["4.36.2", "installed"])
def test_training_data_and_the_exported_template_agree_and_the_fine_tuned_model_chats_alike(exports, version,
                                                                                             tmp_path):
    import transformers

    served = serve(exports, version, tmp_path)
    assert served["version"] == (version or transformers.__version__)
    for name, (folder, tokens) in exports.items():
        template = CHAT_TEMPLATES[name]
        for kind in ("fast", "slow") if name != "llama3" else ("fast",):
            assert served[name][kind] == [abs(t) for t in tokens], (name, kind)
        # the generation config stops at EOS and at the template's end of turn
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert served[name]["end_of_turn"] == tokenizer.convert_tokens_to_ids(template.end_of_turn)
        assert served[name]["eos"] == [tokenizer.eos_token_id, served[name]["end_of_turn"]]
        assert json.loads((folder / "config.json").read_text())["chat_template"] == name
        assert tokenizer.chat_template == template.jinja
        assert len(tokenizer) <= json.loads((folder / "config.json").read_text())["vocab_size"]  # no id past the model
        # trained: exactly the replies, each with its end-of-turn token
        assert [tokenizer.decode(run) for run in trained_runs(tokens)] == \
            [reply + template.end_of_turn for _, reply in TURNS], name

    # the fine-tuned model: its reply, through model.chat and through apply_chat_template + generate
    folder = exports["internlm2"][0]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = model.build_inputs(tokenizer, QUERY, HISTORY, meta_instruction=SYSTEM)["input_ids"]
    with torch.no_grad():
        new = model.generate(prompt, **GREEDY)[0, prompt.shape[1]:].tolist()
    reply, _ = model.chat(tokenizer, QUERY, HISTORY, meta_instruction=SYSTEM, **GREEDY)
    assert new[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # generate stopped at the end of turn
    assert tokenizer.decode(new[:-1]) == reply == TURNS[2][1]  # the reply it was trained on
    assert served["chat"]["prompt"] == prompt[0].tolist()
    assert served["generate"] == served["chat"]["new"] == new and served["chat"]["reply"] == reply


def test_the_templates_render_the_published_prompts_and_refuse_a_tokenizer_without_their_tokens(exports, tmp_path,
                                                                                                 capsys):
    # InternLM v1: InternLM's published `build_inputs` (InternLM/InternLM b9c813a, tools/transformers/internlm_model/
    # modeling_internlm.py), BOS from its tokenizer
    internlm = "".join(f"<|User|>:{q}<eoh>\n<|Bot|>:{r}<eoa>\n" for q, r in HISTORY) + \
        f"<|User|>:{QUERY}<eoh>\n<|Bot|>:"
    # InternLM2: ChatML as InternLM2's published `build_inputs` writes it (InternEvo's transformers/internlm2_model)
    internlm2 = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n" + "".join(
        f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{r}<|im_end|>\n" for q, r in HISTORY) +
        f"<|im_start|>user\n{QUERY}<|im_end|>\n<|im_start|>assistant\n")
    chatml_pieces = {"<|im_start|>": "[UNUSED_TOKEN_146]", "<|im_end|>": "[UNUSED_TOKEN_145]"}
    for name, published, system, sentencepiece_model in (("internlm", internlm, "", TOKENIZER),
                                                         ("internlm2", internlm2, SYSTEM, INTERNLM2_TOKENIZER)):
        folder = exports[name][0]
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        rendered = tokenizer.apply_chat_template(
            [*([{"role": "system", "content": system}] if system else []), *MESSAGES[1:-1]], tokenize=False,
            add_generation_prompt=True)
        assert rendered == "<s>" + published, name  # byte for byte
        # the ids of the published tokenizer(prompt): BOS, then the SentencePiece pieces
        sp = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))
        pieces = published
        for token, piece in chatml_pieces.items():
            pieces = pieces.replace(token, piece)
        assert model.build_inputs(tokenizer, QUERY, HISTORY, meta_instruction=system)["input_ids"][0].tolist() == \
            [1] + sp.encode(pieces), name

    # Llama-3: the published template string, rendered by transformers, with and without a system prompt, padded
    # contents (both trim them) and the generation prompt
    tokenizer = AutoTokenizer.from_pretrained(exports["llama3"][0])
    padded = [{**message, "content": f"  {message['content']}\n"} for message in MESSAGES]
    for messages in (MESSAGES, MESSAGES[1:], padded, MESSAGES[:-1]):
        for generation_prompt in (False, True):
            ours, published = (tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False,
                                                             add_generation_prompt=generation_prompt)
                               for jinja in (CHAT_TEMPLATES["llama3"].jinja, LLAMA3_PUBLISHED))
            assert ours == published and ours.startswith("<|begin_of_text|><|start_header_id|>")

    # a tokenizer without the template's tokens: model.chat, the chat tools and the exporter say so in one line
    missing = "has no <eoh>, <eoa> token(s), which the 'internlm' chat template needs"
    with pytest.raises(ValueError, match=re.escape(missing)):
        AutoModelForCausalLM.from_pretrained(exports["internlm"][0]).build_inputs(tokenizer, QUERY)
    with pytest.raises(InferenceError, match=re.escape(missing)):
        load_for_inference(exports["llama3"][0], chat_template="internlm")
    native = exports["internlm"][0].parent / "native"
    assert convert2hf(["--src", str(native), "--tgt", str(tmp_path / "hf"), "--tokenizer", str(exports["llama3"][0]),
                       "--chat_template", "internlm"]) == 1
    assert missing in capsys.readouterr().err and not (tmp_path / "hf").exists()


def test_the_chat_tools_help_names_every_template_without_loading_the_registry():
    """tools/chat.py and tools/web_demo.py spell the template names in --help (the registry's import would load
    transformers before --help prints); a template added to the registry must be named there too."""
    from evods.cli.chat import chat_parser

    help_text = " ".join(chat_parser("", "").format_help().split())
    for name in CHAT_TEMPLATES:
        assert re.search(rf"\b{name}\b", help_text), (name, help_text)


def test_an_unknown_chat_template_is_one_line_naming_the_known_ones(tmp_path):
    from testkit.chat_models import tiny_chat_folder

    folder = tiny_chat_folder(tmp_path / "hf")
    with pytest.raises(InferenceError, match="--chat_template 'bogus': use one of internlm, internlm2, llama3"):
        load_for_inference(str(folder), chat_template="bogus")
