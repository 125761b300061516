"""The frozen layers' cache changes nothing but speed: the same loss and the same gradients."""

import pytest
import torch
from conftest import ANSWERS, DOCUMENTS, QUESTIONS

from mbc.training.activations import LowerLayerCache
from mbc.training.objectives import StepObjective


def _loss_and_grads(objective, model):
    model.zero_grad()
    out = objective(DOCUMENTS, QUESTIONS, ANSWERS, [0, 1])
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.qa_loss.detach(), grads


@pytest.mark.parametrize("llm", ["gpt2", "llama"])
def test_cached_lower_layers_give_the_same_loss_and_gradients(tiny_model, llm):
    # 3 layers: a prefix and KV-LoRA on the top 2, so layer 0 is frozen and cached.
    # eval: no dropout, no codebook updates between the calls; gradients flow all the same
    model = tiny_model(llm, prefix_layers=2, lora_layers=2).eval()
    torch.nn.init.normal_(model.prefix_expansion.blocks.w2, std=0.02)  # a prefix that is not zero
    cache = LowerLayerCache(model)
    assert model.first_adapted_layer == 1 and cache.enabled
    plain_loss, plain_grads = _loss_and_grads(StepObjective(model), model)
    cached = StepObjective(model, cache)
    for _ in range(2):  # computed in the first step, reused in the second
        loss, grads = _loss_and_grads(cached, model)
        torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == plain_grads.keys() and len(grads) > 20
        for name in grads:
            torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
        assert len(cache.rows) == len(QUESTIONS)
    assert any(n.startswith("llm.") for n in grads) and any(n.startswith("prefix_expansion.") for n in grads)


def test_rows_cached_in_another_batch_give_the_same_inputs(tiny_model):
    model = tiny_model(prefix_layers=2, lora_layers=2).eval()
    cache = LowerLayerCache(model)
    together = cache.inputs(QUESTIONS, ANSWERS)
    alone = LowerLayerCache(model).inputs(QUESTIONS[1:], ANSWERS[1:])
    length = int(alone[1].sum())
    torch.testing.assert_close(together[0][1, :length], alone[0][0, :length], rtol=1e-5, atol=1e-6)


def test_the_cache_is_off_where_every_layer_is_adapted(tiny_model):
    model = tiny_model(prefix_layers=None, lora_layers=2)  # the paper: a prefix in every layer
    assert model.first_adapted_layer == 0 and not LowerLayerCache(model).enabled
    assert StepObjective(model, LowerLayerCache(model)).lower_cache is None
