"""The DistilGPT2 preset's shapes at random weights, for benchmarks (speed does not depend on the
weights): a DistilGPT2-shaped GPT-2 (6 layers, 768 wide, 12 heads) and a t5-small-shaped T5 (6+6
layers, 512 wide), with the SmolLM2 and MiniLM tokenizers standing in for GPT-2's and T5's."""

from __future__ import annotations

import tempfile
from pathlib import Path


def save_distilgpt2_shaped_backbones() -> Path:
    """Random DistilGPT2- and t5-small-shaped backbones in a folder (made by the parent process, so
    that making them does not count in a measured process's peak memory)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, T5Config, T5Model

    from mbc.network.backbones import bundled_minilm_folder, bundled_smollm2_folder

    folder = Path(tempfile.mkdtemp(prefix="mbc-bench-"))
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(vocab_size=49152, n_layer=6, n_embd=768, n_head=12, n_positions=1024, bos_token_id=1, eos_token_id=2)
    ).save_pretrained(folder / "gpt2")
    AutoTokenizer.from_pretrained(bundled_smollm2_folder()).save_pretrained(folder / "gpt2")
    T5Model(T5Config(vocab_size=32128, d_model=512, d_ff=2048, d_kv=64, num_layers=6, num_heads=8)).save_pretrained(
        folder / "t5"
    )
    AutoTokenizer.from_pretrained(bundled_minilm_folder()).save_pretrained(folder / "t5")
    return folder


def distilgpt2_shaped_model(folder: Path, **overrides):
    from mbc import MBCConfig, MBCModel
    from mbc.presets import preset

    values = preset("distilgpt2")["model"]
    values.update(
        llm=str(folder / "gpt2"), document_encoder=str(folder / "t5"), question_encoder=str(folder / "t5"), **overrides
    )
    return MBCModel.build(MBCConfig(**values))
