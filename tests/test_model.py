import numpy as np
import pytest
import torch
from conftest import ANSWERS, DOCUMENTS, QUESTIONS

from mbc import DecodingConfig, MBCConfig, MBCError
from mbc.network.lora import lora_disabled
from mbc.network.prefix import prefix_in


@pytest.mark.parametrize("llm,encoder", [("gpt2", "bert"), ("llama", "bert"), ("gpt2", "t5"), ("llama", "t5")])
def test_shapes_end_to_end(tiny_model, llm, encoder):
    model = tiny_model(llm, encoder)
    cfg, layout = model.config, model.llm.layout
    contexts = model.amortize(DOCUMENTS)
    assert contexts.shape == (3, cfg.num_slots, layout.hidden_size)
    entries = model.compress(DOCUMENTS)
    assert entries.shape == (3, cfg.num_slots, 1) and entries.dtype == np.uint8
    memory = model.memory(entries)
    assert memory.shape == (3 * cfg.num_slots, layout.hidden_size)
    modulation = model.modulation(QUESTIONS, memory)
    assert modulation.shape == (2, cfg.num_slots, layout.hidden_size)
    prefix = model.prefix(modulation)
    assert len(prefix) == layout.num_layers  # prefix_layers=None: every layer
    for key, value in prefix:
        assert key.shape == value.shape == (2, layout.num_kv_heads, cfg.prefix_tokens, layout.head_dim)
    out = model(DOCUMENTS[:2], QUESTIONS, ANSWERS)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.vq_loss > 0
    answers = model.answer(QUESTIONS, memory, DecodingConfig(max_new_tokens=4))
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_grouped_kv_heads_shape_the_prefix(tiny_model):
    model = tiny_model("llama")
    assert model.llm.layout.num_kv_heads == 2 and model.llm.model.config.num_attention_heads == 4


@pytest.mark.parametrize("llm", ["gpt2", "llama"])
def test_zero_effect_case_equals_base_model_exactly(tiny_model, tiny_paths, llm):
    from mbc.network.backbones import load_llm

    base = load_llm(tiny_paths[llm]).model.eval()
    model = tiny_model(llm).eval()
    # Make the adapters non-trivial so "off" really has something to switch off.
    for name, p in model.llm.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    ids = torch.randint(3, 259, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    expected = base(input_ids=ids, attention_mask=mask).logits
    with lora_disabled(model.llm.model):
        assert torch.equal(model.llm.model(input_ids=ids, attention_mask=mask).logits, expected)
    assert not torch.allclose(model.llm.model(input_ids=ids, attention_mask=mask).logits, expected)


@pytest.mark.parametrize("llm", ["gpt2", "llama"])
def test_fresh_lora_leaves_base_unchanged_and_prefix_changes_output(tiny_model, tiny_paths, llm):
    from mbc.network.backbones import load_llm

    base = load_llm(tiny_paths[llm]).model.eval()
    model = tiny_model(llm).eval()
    ids = torch.randint(3, 259, (2, 7))
    mask = torch.ones_like(ids)
    expected = base(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(model.llm.model(input_ids=ids, attention_mask=mask).logits, expected)  # B starts at zero
    prefix = model.prefix(model.modulation(QUESTIONS, model.memory(model.compress(DOCUMENTS))))
    with prefix_in(model.llm.layout, prefix):
        prefixed = model.llm.model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(prefixed, expected)


def test_lora_only_on_key_and_value_of_last_layers(tiny_model):
    model = tiny_model("gpt2", lora_layers=2)
    names = [n for n, p in model.llm.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {n.split(".")[2] for n in names} == {"1", "2"}  # transformer.h.<i>: the last two of three
    assert all(".adapter_k." in n or ".adapter_v." in n for n in names)
    llama = tiny_model("llama", lora_layers=1)
    names = [n for n, p in llama.llm.model.named_parameters() if p.requires_grad]
    assert {n.split(".")[4] for n in names} == {"k_proj", "v_proj"} and {n.split(".")[2] for n in names} == {"2"}


def test_prefix_on_last_layers_only(tiny_model):
    model = tiny_model("llama", prefix_layers=1)
    prefix = model.prefix(model.modulation(QUESTIONS, model.memory(model.compress(DOCUMENTS))))
    assert len(prefix) == 1
    out = model(DOCUMENTS[:2], QUESTIONS, ANSWERS)
    assert torch.isfinite(out.loss)


def test_straight_through_gradient_reaches_amortization_network(tiny_model):
    model = tiny_model().train()
    torch.nn.init.normal_(model.prefix_expansion.blocks.w2, std=0.1)  # as after some training (it starts at zero)
    out = model(DOCUMENTS[:2], QUESTIONS, ANSWERS)
    out.qa_loss.backward()  # the QA loss alone: its only path to the encoder is the straight-through estimator
    grads = [p.grad for p in model.amortization.slot_mlp.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert model.amortization.encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert model.quantizer.stages[0].codebook.grad is None  # QA loss does not move the codebook


def test_vq_loss_moves_the_codebook(tiny_model):
    model = tiny_model().train()
    model(DOCUMENTS[:2], QUESTIONS, ANSWERS).vq_loss.backward()
    assert model.quantizer.stages[0].codebook.grad.abs().sum() > 0


def test_cosine_codebook_bank_decodes_to_what_training_reads(tiny_model):
    model = tiny_model(codebook_metric="cosine").train()
    model(DOCUMENTS, QUESTIONS + ["Who?"], ANSWERS + ["Ann"])  # revive codes from real outputs
    model.eval()
    contexts = model.amortize(DOCUMENTS)
    memory = model.memory(model.compress(DOCUMENTS))
    assert torch.allclose(memory, model.quantizer(contexts).quantized.reshape(memory.shape), atol=1e-5)
    assert torch.allclose(memory.norm(dim=-1), torch.full((len(memory),), model.llm.layout.hidden_size**0.5), atol=1e-4)
    with pytest.raises(MBCError, match="one codebook stage"):
        MBCConfig(codebook_metric="cosine", codebook_stages=2)
    with pytest.raises(MBCError, match="codebook_metric"):
        MBCConfig(codebook_metric="dot")


def test_mac_mode_stores_floats(tiny_model):
    model = tiny_model(quantize=False)
    entries = model.compress(DOCUMENTS)
    assert entries.dtype == np.float32 and entries.shape == (3, 4, model.llm.layout.hidden_size)
    assert model.codebook_fingerprint() is None
    out = model(DOCUMENTS[:2], QUESTIONS, ANSWERS)
    assert out.vq_loss == 0 and torch.isfinite(out.loss)


def test_residual_quantization_stores_one_index_per_stage(tiny_model):
    model = tiny_model(codebook_stages=3)
    entries = model.compress(DOCUMENTS)
    assert entries.shape == (3, 4, 3)
    assert model.bytes_per_document()["mbc"] == 6  # 4 vectors x 3 stages x 4 bits


def test_slot_norm_standardises_across_documents_and_freezes_in_eval():
    from mbc.network.amortization import SlotNorm

    torch.manual_seed(0)
    offsets = torch.randn(3, 8) * 1000  # a huge constant per slot, as measured on the real network
    norm = SlotNorm(3, 8, momentum=0.5).train()
    for _ in range(20):
        out = norm(offsets + 0.1 * torch.randn(16, 3, 8))
    assert out.mean(0).abs().max() < 1e-2 and torch.allclose(out.pow(2).mean(dim=(0, 2)), torch.ones(3), atol=1e-3)
    assert torch.allclose(norm.running_mean, offsets, atol=0.1) and torch.allclose(
        norm.running_std, torch.full((3, 1), 0.1), atol=0.02
    )
    norm.eval()
    z = offsets + 0.1 * torch.randn(4, 3, 8)
    before = norm.running_mean.clone()
    assert torch.allclose(norm(z), (z - offsets) / 0.1, atol=1.0)
    assert torch.equal(norm.running_mean, before)


def test_fingerprint_covers_slot_norm_statistics(tiny_model):
    model = tiny_model()
    first = model.codebook_fingerprint()
    model.amortization.slot_norm.running_std += 1
    assert model.codebook_fingerprint() != first


@pytest.mark.parametrize("llm", ["gpt2", "llama"])
def test_qa_loss_equals_the_llms_own_loss_on_the_answer_tokens(tiny_model, llm):
    model = tiny_model(llm).eval()
    memory = model.memory(model.compress(DOCUMENTS))
    prefix = model.prefix(model.modulation(QUESTIONS, memory))
    ids, mask, labels = model.llm.training_inputs(QUESTIONS, ANSWERS)
    with prefix_in(model.llm.layout, prefix):
        expected = model.llm.model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.allclose(model.llm.qa_loss(QUESTIONS, ANSWERS, prefix), expected, atol=1e-5)
