"""Where things are inside a causal LM, for the two families of the paper.

GPT-2 fuses the query, key and value projections into one ``c_attn`` (a ``Conv1D``) and has as many
key/value heads as query heads. Llama (and its relatives: Mistral, Qwen2, SmolLM2) has separate
``k_proj`` / ``v_proj`` and may group several query heads per key/value head.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mbc.errors import MBCError


@dataclass
class LLMLayout:
    family: str  # "gpt2" or "llama"
    attentions: list[nn.Module]  # one self-attention module per layer, bottom to top
    hidden_size: int
    num_kv_heads: int
    head_dim: int

    @property
    def num_layers(self) -> int:
        return len(self.attentions)

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def describe_llm(model: nn.Module) -> LLMLayout:
    config = model.config
    if hasattr(model, "transformer") and hasattr(model.transformer, "h"):
        heads = config.n_head
        return LLMLayout(
            "gpt2", [block.attn for block in model.transformer.h], config.n_embd, heads, config.n_embd // heads
        )
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is not None and all(hasattr(layer.self_attn, "k_proj") for layer in layers):
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return LLMLayout("llama", [layer.self_attn for layer in layers], config.hidden_size, kv_heads, head_dim)
    raise MBCError(
        f"unsupported base LLM architecture '{type(model).__name__}': MBC knows GPT-2 style models (fused c_attn) "
        "and Llama style models (separate k_proj / v_proj)"
    )
