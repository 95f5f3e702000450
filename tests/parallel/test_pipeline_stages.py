"""The pipeline stages of the InternLM model (evods.parallel.pipeline_stages): in sequence they compute the model's
forward, and their parameters are the model's own under names that map back to its Hugging Face names."""
import pytest
import torch

from evods.parallel import DecoderStage, EmbeddingStage, HeadStage, pipeline_layers, pipeline_parameter_name
from tests.model.test_model import make_model, packed_row

torch.set_num_threads(1)


def test_pipeline_stages_in_sequence_equal_the_model():
    model = make_model(num_hidden_layers=3)
    stages = pipeline_layers(model)
    assert [type(s) for s in stages] == [EmbeddingStage, DecoderStage, DecoderStage, DecoderStage, HeadStage]
    generator = torch.Generator().manual_seed(3)
    rows = [packed_row(lengths, 97, generator) for lengths in ([4, 8], [12])]
    ids, positions = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    with torch.no_grad():
        x = (ids, positions)
        for stage in stages:
            x = stage(x)
        assert x.dtype == torch.float32
        assert torch.equal(x, model(ids, position_ids=positions).logits)

    model_params = dict(model.named_parameters())
    mapped = {}
    for index, stage in enumerate(stages):
        for local_name, param in stage.named_parameters():
            hf_name = pipeline_parameter_name(index, local_name, num_layers=3)
            assert model_params[hf_name] is param, (index, local_name, hf_name)
            mapped[hf_name] = param
    assert mapped.keys() == model_params.keys()
    assert pipeline_parameter_name(2, "layer.self_attn.q_proj.weight", 3) == "model.layers.1.self_attn.q_proj.weight"
    with pytest.raises(ValueError, match="no parameter"):
        pipeline_parameter_name(0, "lm_head.weight", 3)
