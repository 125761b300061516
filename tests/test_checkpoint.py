import json

import pytest
import torch
from conftest import ANSWERS, DOCUMENTS, QUESTIONS
from safetensors.torch import load_file, save_file

from mbc import MBCError, MBCModel
from mbc.checkpoint import CONFIG_NAME, WEIGHTS_NAME


def _train_a_little(model):
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model(DOCUMENTS[:2], QUESTIONS, ANSWERS).loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize(
    "llm,encoder,quantize,standardize_modulation,update",
    [
        ("llama", "bert", True, False, "gradient"),
        ("gpt2", "t5", True, False, "gradient"),
        ("llama", "bert", False, False, "gradient"),
        ("llama", "bert", True, True, "gradient"),
        ("llama", "bert", True, False, "ema"),
    ],
)
def test_save_load_same_outputs(tiny_model, tmp_path, llm, encoder, quantize, standardize_modulation, update):
    model = _train_a_little(
        tiny_model(
            llm, encoder, quantize=quantize, standardize_modulation=standardize_modulation, codebook_update=update
        )
    )
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["config"]["llm"] == model.config.llm and meta["codebook_fingerprint"] == model.codebook_fingerprint()
    loaded = MBCModel.from_pretrained(tmp_path).eval()
    entries = model.compress(DOCUMENTS)
    assert (loaded.compress(DOCUMENTS) == entries).all()
    memory = model.memory(entries)
    assert torch.equal(loaded.memory(entries), memory)
    assert torch.equal(loaded.modulation(QUESTIONS, memory), model.modulation(QUESTIONS, memory))
    assert loaded.answer(QUESTIONS, memory) == model.answer(QUESTIONS, memory)
    prefix, loaded_prefix = (
        model.prefix(model.modulation(QUESTIONS, memory)),
        loaded.prefix(loaded.modulation(QUESTIONS, memory)),
    )
    assert all(torch.equal(a[1], b[1]) for a, b in zip(prefix, loaded_prefix))  # modulation statistics included
    with torch.no_grad():
        assert torch.equal(
            loaded(DOCUMENTS[:2], QUESTIONS, ANSWERS).loss, model(DOCUMENTS[:2], QUESTIONS, ANSWERS).loss
        )


def test_checkpoint_holds_trainable_parts_only(tiny_model, tmp_path):
    model = tiny_model(train_encoders=False)
    model.save_pretrained(tmp_path)
    names = set(load_file(tmp_path / WEIGHTS_NAME))
    assert not any(".encoder." in n for n in names)  # frozen encoders are named in the config instead
    assert not any(n.startswith("llm.") and "lora_" not in n for n in names)
    assert "quantizer.stages.0.codebook" in names and "quantizer.stages.0.usage" in names


def test_corrupted_codebook_is_refused(tiny_model, tmp_path):
    tiny_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / WEIGHTS_NAME)
    state["quantizer.stages.0.codebook"][0, 0] += 1.0
    save_file(state, tmp_path / WEIGHTS_NAME)
    with pytest.raises(MBCError, match="fingerprint"):
        MBCModel.from_pretrained(tmp_path)


def test_missing_checkpoint_and_mismatched_weights_are_clear_errors(tiny_model, tmp_path):
    with pytest.raises(MBCError, match="not an MBC checkpoint"):
        MBCModel.from_pretrained(tmp_path)
    tiny_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / WEIGHTS_NAME)
    del state["aggregator.blocks.0.to_q.weight"]
    save_file(state, tmp_path / WEIGHTS_NAME)
    with pytest.raises(MBCError, match="missing"):
        MBCModel.from_pretrained(tmp_path)
