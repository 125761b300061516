import json
import os

import pytest
import torch
from conftest import ANSWERS, DOCUMENTS, QUESTIONS
from safetensors.torch import load_file, save_file

from mbc import MBCError, MBCModel, checkpoint
from mbc.checkpoint import CONFIG_NAME, WEIGHTS_NAME, sha256_of


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


def _rewrite_weights(folder, state) -> None:
    """Other weights with a matching digest: what only the deeper checks can catch."""
    save_file(state, folder / WEIGHTS_NAME)
    meta = json.loads((folder / CONFIG_NAME).read_text())
    meta["sha256"][WEIGHTS_NAME] = sha256_of(folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(meta))


def test_corrupted_codebook_is_refused(tiny_model, tmp_path):
    tiny_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / WEIGHTS_NAME)
    state["quantizer.stages.0.codebook"][0, 0] += 1.0
    _rewrite_weights(tmp_path, state)
    with pytest.raises(MBCError, match="fingerprint"):
        MBCModel.from_pretrained(tmp_path)


def test_any_changed_tensor_file_is_refused(tiny_model, tmp_path):
    tiny_model().save_pretrained(tmp_path)
    data = bytearray((tmp_path / WEIGHTS_NAME).read_bytes())
    data[-5] ^= 0x10  # one bit in the last tensor's bytes
    (tmp_path / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(MBCError, match="does not match the SHA-256 recorded"):
        MBCModel.from_pretrained(tmp_path)


def test_a_crash_while_saving_leaves_a_whole_checkpoint(tiny_model, tmp_path, monkeypatch):
    first, second = tiny_model(seed=0), tiny_model(seed=1)
    first.save_pretrained(tmp_path / "ckpt")
    real_write = checkpoint.write

    def crash_midway(model, folder):
        real_write(model, folder)
        (folder / WEIGHTS_NAME).write_bytes(b"half")
        raise OSError("killed")

    monkeypatch.setattr(checkpoint, "write", crash_midway)
    with pytest.raises(OSError):
        second.save_pretrained(tmp_path / "ckpt")
    monkeypatch.undo()
    assert MBCModel.from_pretrained(tmp_path / "ckpt").codebook_fingerprint() == first.codebook_fingerprint()
    # Killed between the two renames: the folder is gone, its previous version lies beside it.
    renames, real_rename = [], os.rename

    def killed_after_one(source, target):
        if renames:
            raise OSError("killed")
        renames.append(target)
        real_rename(source, target)

    monkeypatch.setattr(checkpoint.os, "rename", killed_after_one)
    with pytest.raises(OSError):
        second.save_pretrained(tmp_path / "ckpt")
    monkeypatch.undo()
    assert not (tmp_path / "ckpt").exists()
    assert MBCModel.from_pretrained(tmp_path / "ckpt").codebook_fingerprint() == first.codebook_fingerprint()
    second.save_pretrained(tmp_path / "ckpt")  # the next save takes over cleanly
    assert MBCModel.from_pretrained(tmp_path / "ckpt").codebook_fingerprint() == second.codebook_fingerprint()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / CONFIG_NAME).write_text(""), "not readable JSON"),
        (lambda f: (f / CONFIG_NAME).write_text("[1, 2]"), "not a JSON object"),
        (lambda f: (f / CONFIG_NAME).write_text('{"sha256": {}}'), "no 'config' object"),
        (lambda f: _edit_config(f, lora_dropout=2), "lora_dropout must be"),
        (lambda f: _edit_config(f, beta=-5), "beta must be"),
        (lambda f: _edit_config(f, codebook_size=2**30), "codebook_size must be"),
        (lambda f: _edit_config(f, num_slots="12"), "num_slots must be a whole number"),
        (lambda f: _edit_config(f, quantize="False"), "quantize must be true or false"),
        (lambda f: _edit_config(f, num_slots=6), "tensors of other shapes"),
        (lambda f: (f / WEIGHTS_NAME).write_bytes(b"not safetensors"), "SHA-256"),
    ],
)
def test_damaged_checkpoints_get_one_line(tiny_model, tmp_path, damage, message):
    tiny_model().save_pretrained(tmp_path)
    damage(tmp_path)
    with pytest.raises(MBCError, match=message):
        MBCModel.from_pretrained(tmp_path)


def _edit_config(folder, **changes) -> None:
    meta = json.loads((folder / CONFIG_NAME).read_text())
    meta["config"].update(changes)
    (folder / CONFIG_NAME).write_text(json.dumps(meta))


def test_missing_checkpoint_and_mismatched_weights_are_clear_errors(tiny_model, tmp_path):
    with pytest.raises(MBCError, match="not an MBC checkpoint"):
        MBCModel.from_pretrained(tmp_path)
    tiny_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / WEIGHTS_NAME)
    del state["aggregator.blocks.0.to_q.weight"]
    _rewrite_weights(tmp_path, state)
    with pytest.raises(MBCError, match="missing"):
        MBCModel.from_pretrained(tmp_path)
