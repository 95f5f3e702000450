"""The InternLM model as a Hugging Face model; importing it registers it with transformers' Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .chat_templates import CHAT_TEMPLATES, ChatTemplate, chat_template_named
from .configuration_internlm import InternLMConfig
from .internevo import config_from_model_dict, intermediate_size
from .modeling_internlm import (
    DecoderStage,
    EmbeddingStage,
    HeadStage,
    InternLMForCausalLM,
    InternLMModel,
    pipeline_parameter_name,
    set_activation_checkpointing,
)
from .registry import MODEL_INITIALIZER

AutoConfig.register(InternLMConfig.model_type, InternLMConfig)
AutoModel.register(InternLMConfig, InternLMModel)
AutoModelForCausalLM.register(InternLMConfig, InternLMForCausalLM)
# save_pretrained then copies configuration_internlm.py and modeling_internlm.py and writes auto_map, so the folder
# loads with trust_remote_code=True without evods.
InternLMConfig.register_for_auto_class()
InternLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "InternLMConfig",
    "InternLMModel",
    "InternLMForCausalLM",
    "EmbeddingStage",
    "DecoderStage",
    "HeadStage",
    "MODEL_INITIALIZER",
    "CHAT_TEMPLATES",
    "ChatTemplate",
    "chat_template_named",
    "config_from_model_dict",
    "intermediate_size",
    "pipeline_parameter_name",
    "set_activation_checkpointing",
]
