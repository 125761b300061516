"""What training keeps of frozen work changes nothing but speed: the same loss and the same gradients."""

import pytest
import torch
from conftest import ANSWERS, DOCUMENTS, QUESTIONS

from mbc.training.activations import FrozenActivations, FrozenStore
from mbc.training.objectives import StepObjective


def _loss_and_grads(objective, model):
    model.zero_grad()
    out = objective(DOCUMENTS, QUESTIONS, ANSWERS, [0, 1])
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.qa_loss.detach(), grads


def _same_step_with_and_without(model, frozen):
    torch.nn.init.normal_(model.prefix_expansion.blocks.w2, std=0.02)  # a prefix that is not zero
    plain_loss, plain_grads = _loss_and_grads(StepObjective(model), model)
    cached = StepObjective(model, frozen)
    assert cached.frozen is frozen
    for _ in range(2):  # computed in the first step, reused in the second
        loss, grads = _loss_and_grads(cached, model)
        torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == plain_grads.keys() and len(grads) > 20
        for name in grads:
            torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    return grads


@pytest.mark.parametrize("llm", ["gpt2", "llama"])
def test_kept_llm_layers_give_the_same_loss_and_gradients(tiny_model, llm):
    # 3 layers: a prefix and KV-LoRA on the top 2, so layer 0 is frozen and kept.
    # eval: no dropout and no codebook updates between the calls; gradients flow all the same.
    model = tiny_model(llm, prefix_layers=2, lora_layers=2).eval()
    frozen = FrozenActivations(model)
    assert model.llm.first_adapted_layer == 1 and frozen.llm is not None and frozen.documents is None
    grads = _same_step_with_and_without(model, frozen)
    assert frozen.sizes()["llm"][0] == len(QUESTIONS)
    assert any(n.startswith("llm.") for n in grads) and any(n.startswith("prefix_expansion.") for n in grads)


def test_kept_encoder_layers_give_the_same_loss_and_gradients(tiny_model):
    model = tiny_model(prefix_layers=2, lora_layers=2, encoder_trained_layers=1).eval()  # the tiny BERT: 2 layers
    frozen = FrozenActivations(model)
    assert model.amortization.frozen_layers == 1 and frozen.documents is not None and frozen.questions is not None
    grads = _same_step_with_and_without(model, frozen)
    assert frozen.sizes()["documents"][0] == len(DOCUMENTS) and frozen.sizes()["questions"][0] == len(QUESTIONS)
    trained = [n for n in grads if n.startswith("amortization.encoder.")]
    assert trained and all(".layer.1." in n for n in trained)  # only the top layer trains


def test_frozen_encoder_layers_keep_no_dropout_in_training(tiny_model):
    model = tiny_model(encoder_trained_layers=1).train()
    encoder = model.amortization.encoder
    assert not encoder.embeddings.training and not encoder.encoder.layer[0].training
    assert encoder.encoder.layer[1].training
    assert not any(p.requires_grad for p in encoder.encoder.layer[0].parameters())


def test_nothing_is_kept_where_nothing_lies_below(tiny_model):
    model = tiny_model(prefix_layers=None, lora_layers=2)  # the paper: a prefix in every layer
    frozen = FrozenActivations(model)
    assert model.llm.first_adapted_layer == 0 and not frozen.enabled
    assert StepObjective(model, frozen).frozen is None
    t5 = tiny_model(encoder="t5", prefix_layers=None, encoder_trained_layers=1)  # frozen, but not run apart
    assert not t5.amortization.splits and not FrozenActivations(t5).enabled


def test_a_shared_store_serves_a_second_model_on_the_same_backbones(tiny_model, monkeypatch):
    # The main job's case: MBC trains, then MAC on the same rows and the same frozen LLM and encoders.
    store = FrozenStore()
    first = tiny_model(prefix_layers=2, lora_layers=2, encoder_trained_layers=1).eval()
    StepObjective(first, FrozenActivations(first, store))(DOCUMENTS, QUESTIONS, ANSWERS, [0, 1])
    second = tiny_model(prefix_layers=2, lora_layers=2, encoder_trained_layers=1, quantize=False).eval()
    torch.nn.init.normal_(second.prefix_expansion.blocks.w2, std=0.02)
    plain = StepObjective(second)(DOCUMENTS, QUESTIONS, ANSWERS, [0, 1]).qa_loss

    def computed_again(*args):
        raise AssertionError("a kept row was computed again")

    monkeypatch.setattr(second.llm, "lower_hidden", computed_again)
    monkeypatch.setattr(second.amortization, "lower", computed_again)
    monkeypatch.setattr(second.question_network, "lower", computed_again)
    kept = StepObjective(second, FrozenActivations(second, store))(DOCUMENTS, QUESTIONS, ANSWERS, [0, 1]).qa_loss
    torch.testing.assert_close(kept, plain, rtol=1e-5, atol=1e-6)


def test_a_store_keeps_apart_what_different_layers_make(tiny_model):
    store = FrozenStore()
    one = FrozenActivations(tiny_model(prefix_layers=2, lora_layers=2), store)  # layer 0 below the split
    two = FrozenActivations(tiny_model(prefix_layers=1, lora_layers=1), store)  # layers 0-1 below
    assert one.llm is not None and two.llm is not None and one.llm is not two.llm


def test_kept_encoder_layers_give_the_same_loss_and_gradients_through_a_pointer(tiny_model):
    model = tiny_model(
        prefix_layers=2,
        lora_layers=2,
        encoder_trained_layers=1,
        codebook="vocabulary",
        code_pointer=True,
        pointer_layer=1,
    ).eval()
    grads = _same_step_with_and_without(model, FrozenActivations(model))
    assert any(n.startswith("pointer.") for n in grads)
