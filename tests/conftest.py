"""Tiny randomly initialised backbones, built from configs in code and saved as local folders, so
the tests exercise the same loading path (by folder) as real checkpoints, in milliseconds."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5Model,
)

from mbc import MBCConfig, MBCModel

SPECIALS = ["<pad>", "<eos>", "<unk>"]
PAD, EOS = 0, 1


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: every text is encodable, 259 ids in all."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIALS + alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


VOCAB = 3 + 256
TINY_MODELS = {
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB,
            n_positions=256,
            n_embd=32,
            n_layer=3,
            n_head=4,
            initializer_range=0.2,
            bos_token_id=EOS,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )
    ),
    "llama": lambda: LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=EOS,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )
    ),
    "bert": lambda: BertModel(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=256,
            pad_token_id=PAD,
        )
    ),
    "t5": lambda: T5Model(
        T5Config(
            vocab_size=VOCAB,
            d_model=24,
            d_kv=6,
            d_ff=48,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            pad_token_id=PAD,
            eos_token_id=EOS,
            decoder_start_token_id=PAD,
        )
    ),
}


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory) -> dict[str, str]:
    """Folder of each tiny backbone, by family."""
    paths = {}
    for family, make in TINY_MODELS.items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(family)
        make().save_pretrained(folder)
        byte_tokenizer().save_pretrained(folder)
        paths[family] = str(folder)
    return paths


def tiny_config(paths: dict[str, str], llm: str = "llama", encoder: str = "bert", **overrides) -> MBCConfig:
    values = dict(
        llm=paths[llm],
        document_encoder=paths[encoder],
        question_encoder=paths[encoder],
        num_slots=4,
        codebook_size=16,
        aggregator_blocks=2,
        aggregator_heads=2,
        aggregator_head_dim=8,
        prefix_tokens=2,
        lora_layers=2,
        lora_rank=4,
        lora_dropout=0.0,
        reader_blocks=1,
        max_document_tokens=96,
        max_question_tokens=48,
    )
    values.update(overrides)
    return MBCConfig(**values)


@pytest.fixture
def tiny_model(tiny_paths):
    def make(llm: str = "llama", encoder: str = "bert", seed: int = 0, **overrides) -> MBCModel:
        torch.manual_seed(seed)
        return MBCModel.build(tiny_config(tiny_paths, llm, encoder, **overrides))

    return make


DOCUMENTS = [
    "Mira Okafor founded the Brellin Observatory in 1987.",
    "The river Tasse flows through the town of Quelmont.",
    "Dr. Anselm Vey discovered the comet Halvari-3 in 2011.",
]
QUESTIONS = ["Who founded the Brellin Observatory?", "Which river flows through Quelmont?"]
ANSWERS = ["Mira Okafor", "the Tasse"]


MORE_DOCUMENTS = [
    f"Harbour {i} of the {w} coast keeps {i + 2} lighthouses." for i, w in enumerate("old new red far wide".split())
]


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_paths, tmp_path_factory) -> str:
    """A saved tiny model with fitted retrieval keys (each question reads its top-1 document), as
    `mbc ingest`, `mbc ask` and `mbc serve` load one with --model."""
    torch.manual_seed(0)
    model = MBCModel.build(tiny_config(tiny_paths, retrieval_top_k=1, retrieval_subspaces=4, retrieval_codes=4))
    model.retrieval_keys.fit(DOCUMENTS + MORE_DOCUMENTS)
    folder = tmp_path_factory.mktemp("checkpoint") / "tiny"
    model.save_pretrained(folder)
    return str(folder)


# ---- PostgreSQL, for the bank tests that run on both storages -------------------------------------
# A real server from the pgserver wheel's binaries (scripts/local_postgres.py), one per session.
# Where it cannot start the tests that need it skip, except under MBC_REQUIRE_POSTGRES=1 (.ci/run),
# where they fail: CI must not be such a place.

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def start_postgres(folder):
    from local_postgres import LocalPostgres

    try:
        return LocalPostgres(folder).start()
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as error:
        if os.environ.get("MBC_REQUIRE_POSTGRES") == "1":
            raise
        pytest.skip(f"no PostgreSQL server could start here ({error}); install the test extra (pgserver)")


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    server = start_postgres(tmp_path_factory.mktemp("postgres"))
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def bank_address(request, tmp_path):
    """A function giving new bank addresses: files in tmp_path, or banks (schemas) on the session's server."""
    if request.param == "sqlite":
        return lambda name="bank": str(tmp_path / f"{name}.db")
    server = request.getfixturevalue("postgres_server")
    prefix = f"t{uuid.uuid4().hex[:12]}"
    return lambda name="bank": f"{server.url}?bank={prefix}_{name}"
