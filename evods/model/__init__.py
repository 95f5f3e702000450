"""The InternLM model as a Hugging Face model; importing it registers it with transformers' Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .attention_heads import HeadSplit
from .chat_templates import CHAT_TEMPLATES, ChatTemplate, chat_template_named
from .configuration_internlm import InternLMConfig, Rope
from .configuration_internlm2 import InternLM2Config
from .internevo import config_from_model_dict, intermediate_size
from .modeling_internlm import InternLMForCausalLM, InternLMModel, set_activation_checkpointing
from .modeling_internlm2 import InternLM2ForCausalLM, InternLM2Model
from .registry import MODEL_INITIALIZER

AutoConfig.register(InternLMConfig.model_type, InternLMConfig)
AutoModel.register(InternLMConfig, InternLMModel)
AutoModelForCausalLM.register(InternLMConfig, InternLMForCausalLM)
# save_pretrained then copies configuration_internlm.py and modeling_internlm.py and writes auto_map, so the folder
# loads with trust_remote_code=True without evods.
InternLMConfig.register_for_auto_class()
InternLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
# InternLM's published InternLM2 layout, the same way (modeling_internlm2.py)
AutoConfig.register(InternLM2Config.model_type, InternLM2Config)
AutoModel.register(InternLM2Config, InternLM2Model)
AutoModelForCausalLM.register(InternLM2Config, InternLM2ForCausalLM)
InternLM2Config.register_for_auto_class()
InternLM2ForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "HeadSplit",
    "InternLMConfig",
    "InternLM2Config",
    "InternLM2ForCausalLM",
    "Rope",
    "InternLMModel",
    "InternLMForCausalLM",
    "MODEL_INITIALIZER",
    "CHAT_TEMPLATES",
    "ChatTemplate",
    "chat_template_named",
    "config_from_model_dict",
    "intermediate_size",
    "set_activation_checkpointing",
]
