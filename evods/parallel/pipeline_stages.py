"""The InternLM model as the layers of a DeepSpeed `PipelineModule`: [EmbeddingStage, DecoderStage x num_layers,
HeadStage], built around the model's own submodules (they share its parameters); a head tied to the embedding adds
the embedding's copy on the last stage (DeepSpeed's TiedLayerSpec, `pipeline_layers`).

Only fixed-shape tensors travel between pipeline stages: (hidden_states, position_ids). Each decoder stage derives the
packed documents and the RoPE tables from the position_ids itself, with the model's own helpers, so a stage computes
exactly what the model's forward does on packed rows. `pipeline_parameter_name` maps a stage's parameter names back
to the model's (Hugging Face) names, which the checkpoint formats use.
"""
import torch
from torch import nn

from evods.model.modeling_internlm import (
    InternLMDecoderLayer,
    InternLMForCausalLM,
    InternLMRMSNorm,
    InternLMRotaryEmbedding,
    PackedDocuments,
    check_position_ids,
    packed_rope_length,
)


def pipeline_layers(model: InternLMForCausalLM, skip_lm_head: bool = False) -> list[nn.Module]:
    """[EmbeddingStage, DecoderStage x num_layers, HeadStage] for deepspeed.pipe.PipelineModule.

    The stages hold `model`'s own submodules, so they share its parameters; `pipeline_parameter_name` maps their
    parameter names back to the model's. With `skip_lm_head` the last stage outputs the final hidden states, as
    `forward(skip_lm_head=True)`, for a loss that applies lm_head itself.
    """
    layout = PackedRowsLayout(model.model.rotary_emb)
    decoder_stages = [DecoderStage(layer, layout) for layer in model.model.layers]
    head = HeadStage(model.model.norm, model.lm_head, skip_lm_head)
    if not model.config.tie_word_embeddings:
        return [EmbeddingStage(model.model.embed_tokens), *decoder_stages, head]
    # The output head is the input embedding (Llama-3.2 1B/3B): DeepSpeed's TiedLayerSpec puts the embedding on the
    # first stage and a copy on the last one, which holds lm_head (the same parameter in the model); the pipeline
    # engine broadcasts the first stage's weight at the start and sums the two stages' gradients of it before every
    # update (PipelineModule.allreduce_tied_weight_gradients), counting it once in the gradient norm.
    from deepspeed.pipe import TiedLayerSpec

    def tied(forward_fn=None):
        return TiedLayerSpec(TIED_EMBEDDING_KEY, EmbeddingStage, model.model.embed_tokens, forward_fn=forward_fn,
                             tied_weight_attr=["embed_tokens.weight"])

    return [tied(), *decoder_stages, head, tied(forward_fn=_passed_on)]


TIED_EMBEDDING_KEY = "embed_tokens"


def _passed_on(_tied_embedding: nn.Module, outputs):
    """The last stage's place of the tied embedding: it holds the weight for lm_head and computes nothing."""
    return outputs


class EmbeddingStage(nn.Module):
    """(input_ids, position_ids) -> (hidden_states, position_ids)."""

    def __init__(self, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, position_ids = inputs
        check_position_ids(position_ids, *input_ids.shape)
        return self.embed_tokens(input_ids), position_ids


class PackedRowsLayout:
    """The document layout and RoPE tables of the position_ids a pipeline stage is working on.

    Consecutive decoder stages receive the same position_ids tensor object, so they share one derivation (with its
    host sync) per micro-batch instead of one per layer. The identity check (`is`, on an object this holds alive)
    recomputes for any other tensor, e.g. the next micro-batch or a recomputation in backward.
    """

    def __init__(self, rotary_emb: InternLMRotaryEmbedding):
        self.rotary_emb = rotary_emb
        self._position_ids = None
        self._layout = None

    def __call__(self, position_ids: torch.Tensor) -> tuple[PackedDocuments, tuple[torch.Tensor, torch.Tensor]]:
        if self._position_ids is not position_ids:
            documents = PackedDocuments.from_position_ids(position_ids)
            rope = self.rotary_emb(position_ids, packed_rope_length(position_ids, self.rotary_emb))
            self._position_ids, self._layout = position_ids, (documents, rope)
        return self._layout


class DecoderStage(nn.Module):
    """(hidden_states, position_ids) -> (hidden_states, position_ids): one decoder layer on packed rows.

    Only fixed-shape integer position_ids travel between pipeline stages; each stage derives the documents itself.
    """

    def __init__(self, layer: InternLMDecoderLayer, layout: PackedRowsLayout):
        super().__init__()
        self.layer = layer
        self.rotary_emb = layout.rotary_emb  # registered, so that moving the stage to a device moves its tables
        self.layout = layout  # shared by the decoder stages of one model (a plain object, not a submodule)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states, position_ids = inputs
        documents, position_embeddings = self.layout(position_ids)
        return self.layer(hidden_states, position_embeddings, documents=documents), position_ids


class HeadStage(nn.Module):
    """(hidden_states, position_ids) -> fp32 logits [B, T, V]; with `skip_lm_head`, the final normed hidden states
    [B, T, H] (lm_head stays in the stage, whose parameters it is, for the loss to apply)."""

    def __init__(self, norm: InternLMRMSNorm, lm_head: nn.Linear, skip_lm_head: bool = False):
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head
        self.skip_lm_head = skip_lm_head

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        hidden_states, _ = inputs
        hidden_states = self.norm(hidden_states)
        return hidden_states if self.skip_lm_head else self.lm_head(hidden_states).float()


def pipeline_parameter_name(stage_index: int, local_name: str, num_layers: int) -> str:
    """HF parameter name of parameter `local_name` of stage `stage_index` in `pipeline_layers()`.

    (0, "embed_tokens.weight") -> "model.embed_tokens.weight";
    (i + 1, "layer.self_attn.q_proj.weight") -> "model.layers.{i}.self_attn.q_proj.weight";
    (num_layers + 1, "norm.weight") -> "model.norm.weight"; (num_layers + 1, "lm_head.weight") -> "lm_head.weight".
    """
    if stage_index == 0 and local_name.startswith("embed_tokens."):
        return f"model.{local_name}"
    if 1 <= stage_index <= num_layers and local_name.startswith("layer."):
        return f"model.layers.{stage_index - 1}.{local_name.removeprefix('layer.')}"
    if stage_index == num_layers + 1 and local_name.startswith("norm."):
        return f"model.{local_name}"
    if stage_index == num_layers + 1 and local_name.startswith("lm_head."):
        return local_name
    raise ValueError(f"no parameter {local_name!r} in pipeline stage {stage_index} of a {num_layers}-layer model")


def pipeline_layer_index(param_name: str, num_layers: int) -> int:
    """The index in `pipeline_layers()` of the layer that holds HF parameter `param_name` (the inverse of
    `pipeline_parameter_name`): 0 for the embedding, i + 1 for decoder layer i, num_layers + 1 for the norm and head."""
    if param_name.startswith("model.embed_tokens."):
        return 0
    if param_name.startswith("model.layers."):
        return int(param_name.split(".")[2]) + 1
    if param_name.startswith(("model.norm.", "lm_head.")):
        return num_layers + 1
    raise ValueError(f"{param_name!r} is no parameter of a pipelined {num_layers}-layer model")


def stage_layers(num_layers: int, pp_size: int, pp_rank: int, tied_embeddings: bool = False) -> range:
    """The `pipeline_layers()` indices pipeline stage `pp_rank` holds, known before the PipelineModule exists: DeepSpeed
    partitions them with evods' method "type:DecoderStage" (evods.training.engine) as
    `deepspeed.runtime.utils.partition_balanced` over weight 1 per decoder stage and 0 for the embedding, the head and
    (`tied_embeddings`) the last stage's copy of the tied embedding."""
    from deepspeed.runtime.utils import partition_balanced

    parts = partition_balanced(weights=[0, *[1] * num_layers, 0, *[0] * tied_embeddings], num_parts=pp_size)
    return range(parts[pp_rank], parts[pp_rank + 1])
