"""compress on tiny, randomly initialised transformers models built from configs (no download)."""

import pytest
import torch
from full_structure import FullLayer, full_nb_weight_parameters

import structurednets

transformers = pytest.importorskip("transformers")


@pytest.fixture
def full_structure():
    structure = structurednets.register("full", FullLayer, full_nb_weight_parameters)
    yield structure
    structurednets.unregister("full")


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
    )
    return transformers.BertModel(config).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


def tokens():
    return torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))


def test_bert_linears_are_replaced_and_outputs_kept(full_structure):
    model = tiny_bert()
    small, report = structurednets.compress(model, "full", 1.0, include="encoder.*")
    names = [layer.name for layer in report.layers]
    assert len(names) == 2 * 6  # q, k, v, attention output, intermediate, output per layer
    assert all(isinstance(small.get_submodule(n), structurednets.StructuredLayer) for n in names)
    assert isinstance(small.embeddings.word_embeddings, torch.nn.Embedding)
    with torch.no_grad():
        expected = model(input_ids=tokens()).last_hidden_state
        got = small(input_ids=tokens()).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_is_transposed_and_the_tied_head_left_alone(full_structure):
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    small, report = structurednets.compress(model, "full", 1.0)
    names = sorted(layer.name for layer in report.layers)
    assert len(names) == 2 * 4  # c_attn, attn c_proj, c_fc, mlp c_proj per block
    assert all(".h." in name for name in names)
    assert [each.name for each in report.skipped] == ["lm_head"]
    assert "tied" in report.skipped[0].reason
    assert small.lm_head.weight is small.transformer.wte.weight
    layer = small.transformer.h[0].attn.c_attn
    assert isinstance(layer, structurednets.StructuredLayer)
    assert (layer.input_dim, layer.output_dim) == (16, 48)
    with torch.no_grad():
        expected = model(input_ids=tokens()).logits
        got = small(input_ids=tokens()).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_an_untied_lm_head_stays_dense_unless_named(full_structure):
    model = tiny_gpt2()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    _, report = structurednets.compress(model, "full", 1.0)
    assert [each.name for each in report.skipped] == ["lm_head"]
    assert "output embeddings" in report.skipped[0].reason
    _, report = structurednets.compress(model, "full", 1.0, include=["lm_head"])
    assert [each.name for each in report.layers] == ["lm_head"]


def test_compressed_transformer_saves_and_loads_into_a_fresh_model(full_structure, tmp_path):
    small, _ = structurednets.compress(tiny_gpt2(), "full", 1.0)
    path = structurednets.save(small, tmp_path / "gpt2.safetensors")
    torch.manual_seed(5)
    fresh = transformers.GPT2LMHeadModel(small.config).eval()
    restored = structurednets.load(path, fresh)
    assert isinstance(restored.transformer.h[1].mlp.c_fc, structurednets.StructuredLayer)
    assert restored.lm_head.weight is restored.transformer.wte.weight
    with torch.no_grad():
        assert torch.equal(restored(input_ids=tokens()).logits, small(input_ids=tokens()).logits)


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2])
def test_global_allocation_with_calibration_on_transformers(
    full_structure, diagonal_structure, build
):
    """The sensitivities run a backward through the model's ModelOutput; the budget holds."""
    from structurednets.calibration_hooks import output_sensitivities
    from structurednets.compression import _select

    model = build()
    batches = [{"input_ids": tokens()}, {"input_ids": tokens().flip(1)}]
    selected, _ = _select(model, None, None, None)
    sensitivities = output_sensitivities(model, selected, batches)
    assert len(sensitivities) == len(selected)
    # the first output (last_hidden_state, logits) is what counts: BERT's pooler is not in it
    assert all((s == 0) == (name == "pooler.dense") for name, s in sensitivities.items())
    assert all(p.grad is None for p in model.parameters())
    small, report = structurednets.compress(
        model, ["full", "diagonal"], 0.5, calibration=batches, allocation="global"
    )
    assert report.allocated_weights <= report.weight_budget
    assert {layer.structure for layer in report.layers} == {"full", "diagonal"}
    with torch.no_grad():
        small(input_ids=tokens())
