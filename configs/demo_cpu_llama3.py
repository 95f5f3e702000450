# Continue pre-training a Llama-3-shaped Hugging Face folder on tokenizer.json data (README, "Llama-2 and Llama-3"):
#   python tools/tiny_llama3.py --out demo_out/tiny_llama3
#   python tools/tokenizer.py --text_input_path samples/pretrain_en/wiki_demo.txt \
#       --bin_output_path data/llama3/en/wiki.bin --tokenizer_path demo_out/tiny_llama3 --add_eos
#   OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu deepspeed --quiet --num_gpus 2 train_ds.py --config configs/demo_cpu_llama3.py
#   python tools/convert2hf.py --src demo_out/ckpt_llama3/20 --tgt demo_out/llama3_hf --format llama \
#       --tokenizer demo_out/tiny_llama3
# The model dict is the folder's config.json in InternEvo's LLAMA2 keys; a size that disagrees stops the start in
# one line naming both values.
import os.path
import runpy

globals().update({name: value for name, value in runpy.run_path(
    os.path.join(os.path.dirname(__file__), "demo_cpu.py")).items() if not name.startswith("__")})

JOB_NAME = "demo_cpu_llama3"
TOTAL_STEPS = 20
model_type = "LLAMA2"
model = dict(
    num_layers=4,
    hidden_size=128,
    num_attention_heads=8,
    num_kv_attention_heads=2,  # grouped-query attention, as Llama-3
    vocab_size=2048,
    mlp_ratio=4,  # 128 * 4 = 512, the folder's intermediate_size
    no_bias=True,
    rope_base=500000.0,
    rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=128),
    max_position_embeddings=1024,
    tie_word_embeddings=True,  # Llama-3.2 1B/3B: the output head is the embedding
    embed_split_hidden=False,  # a tied embedding splits by vocabulary rows under tensor parallelism
    layer_norm_epsilon=1e-5,
    dtype="torch.float32",
    use_flash_attn=False,
    chat_template="llama3",  # the tokenizer's family: the export writes Llama-3's chat format and end of turn
)
data.update(seq_len=128, total_steps=TOTAL_STEPS, train_folder="data/llama3")  # noqa: F821 (from demo_cpu.py)
lr_scheduler.update(total_steps=TOTAL_STEPS)  # noqa: F821
ckpt = dict(
    enable_save_ckpt=True,
    save_ckpt_folder="local:demo_out/ckpt_llama3",
    checkpoint_every=TOTAL_STEPS,
    auto_resume=False,
    # InternEvo's name for a Hugging Face Llama folder; each rank reads only its part of the shards
    load_ckpt_info=dict(path="local:demo_out/tiny_llama3", content=("model",), ckpt_type="hf_llama"),
)
