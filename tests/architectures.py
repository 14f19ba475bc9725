"""The architecture battery: one tiny, fixed-seed causal LM per architecture a user may bring.

Each entry builds a 2-layer model of its architecture in-process (hidden size 32, the suite's
word-level tokenizer), with the features that make it hard for a batched, cached engine: a sliding
window of ``WINDOW`` tokens (so every test prompt runs past it), hybrid full/sliding layers,
soft-capped logits, tied embeddings, partial rotary embeddings, fused projections, ALiBi,
mixture-of-experts MLPs. ``tests/equivalence/test_architectures.py`` runs the battery and
``scripts/supported_models.py`` turns its results into the table in ``docs/models.md``.

Entries in ``UNSUPPORTED`` have layer types the engine cannot mask per row; they must fail at load
time with a clear error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

WINDOW = 8  # the sliding window of the sliding entries: shorter than every test prompt + its reply


@dataclass(frozen=True)
class Arch:
    """A tiny model of one architecture."""

    name: str  # the row in the table
    family: str  # the transformers model type (``config.model_type``)
    make: Callable[[int], Any]  # vocabulary size -> model (eval mode, float32)
    features: tuple[str, ...] = ()  # what this entry exercises (shown in the table)
    attention: str = "sdpa"
    notes: str = ""
    extra: dict = field(default_factory=dict)


def _build(config_cls: Any, model_cls: Any, attention: str, **kw: Any) -> Callable[[int], Any]:
    def make(vocab: int) -> Any:
        cfg = config_cls(**{"vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **kw})
        cfg._attn_implementation = attention
        torch.manual_seed(0)
        model = model_cls(cfg).eval()
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = 1, 2, 0
        return model
    return make


_LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256)


def _arch(name: str, family: str, config: str, model: str, features: tuple[str, ...] = (), attention: str = "sdpa",
          notes: str = "", **kw: Any) -> Arch:
    import transformers

    make = _build(getattr(transformers, config), getattr(transformers, model), attention, **kw)
    return Arch(name=name, family=family, make=make, features=features, attention=attention, notes=notes)


def battery() -> list[Arch]:
    """Every architecture of the battery (built lazily: transformers is imported here)."""
    L = _LLAMA_LIKE
    return [
        _arch("Llama", "llama", "LlamaConfig", "LlamaForCausalLM", ("GQA", "RoPE"), **L),
        _arch("Qwen2", "qwen2", "Qwen2Config", "Qwen2ForCausalLM", ("qkv bias",), **L),
        _arch("Qwen2 (sliding layers)", "qwen2", "Qwen2Config", "Qwen2ForCausalLM", ("hybrid", "sliding window"),
              use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, **L),
        _arch("Qwen3", "qwen3", "Qwen3Config", "Qwen3ForCausalLM", ("QK norm",), head_dim=8, **L),
        _arch("Qwen3-MoE", "qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", ("mixture of experts",),
              head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
              **L),
        _arch("Mistral (sliding window)", "mistral", "MistralConfig", "MistralForCausalLM", ("sliding window",),
              sliding_window=WINDOW, **L),
        _arch("Mixtral", "mixtral", "MixtralConfig", "MixtralForCausalLM", ("mixture of experts", "sliding window"),
              sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2, **L),
        _arch("Gemma", "gemma", "GemmaConfig", "GemmaForCausalLM", ("tied embeddings", "GeGLU"), head_dim=8, **L),
        _arch("Gemma-2", "gemma2", "Gemma2Config", "Gemma2ForCausalLM",
              ("hybrid", "sliding window", "soft-capped logits", "tied embeddings"), attention="eager",
              notes="transformers offers no SDPA for Gemma-2", head_dim=8,
              sliding_window=WINDOW, **L),
        _arch("Gemma-3", "gemma3_text", "Gemma3TextConfig", "Gemma3ForCausalLM",
              ("hybrid", "sliding window", "local/global RoPE", "tied embeddings"), head_dim=8,
              sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"], **L),
        _arch("Phi-3 (sliding window)", "phi3", "Phi3Config", "Phi3ForCausalLM", ("fused qkv / gate-up", "sliding window"),
              sliding_window=WINDOW, **L),
        _arch("Phi-2", "phi", "PhiConfig", "PhiForCausalLM", ("partial RoPE", "parallel block"),
              partial_rotary_factor=0.5, **L),
        _arch("StableLM", "stablelm", "StableLmConfig", "StableLmForCausalLM", ("partial RoPE", "LayerNorm"), **L),
        _arch("OLMo-2", "olmo2", "Olmo2Config", "Olmo2ForCausalLM", ("QK norm", "post-norm"), **L),
        _arch("OLMo-3", "olmo3", "Olmo3Config", "Olmo3ForCausalLM", ("hybrid", "sliding window"),
              sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"], **L),
        _arch("SmolLM3", "smollm3", "SmolLM3Config", "SmolLM3ForCausalLM", ("NoPE layers",),
              no_rope_layers=[1, 0], **L),
        _arch("Cohere", "cohere", "CohereConfig", "CohereForCausalLM", ("logit scale", "parallel block"),
              logit_scale=0.5, **L),
        _arch("Cohere-2", "cohere2", "Cohere2Config", "Cohere2ForCausalLM", ("hybrid", "sliding window", "logit scale"),
              sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"], **L),
        _arch("Granite", "granite", "GraniteConfig", "GraniteForCausalLM", ("residual / logit multipliers",),
              logits_scaling=2.0, residual_multiplier=0.5, embedding_multiplier=2.0, **L),
        _arch("GLM-4", "glm4", "Glm4Config", "Glm4ForCausalLM", ("fused gate-up", "partial RoPE"), head_dim=8, **L),
        _arch("Starcoder2", "starcoder2", "Starcoder2Config", "Starcoder2ForCausalLM", ("sliding window", "bias"),
              sliding_window=WINDOW, **L),
        _arch("GPT-2", "gpt2", "GPT2Config", "GPT2LMHeadModel", ("learned positions", "fused c_attn", "Conv1D"),
              n_embd=32, n_layer=2, n_head=4, n_positions=256),
        _arch("GPT-NeoX", "gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", ("fused qkv", "partial RoPE"),
              hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, rotary_pct=0.5),
        _arch("GPT-J", "gptj", "GPTJConfig", "GPTJForCausalLM", ("parallel block", "partial RoPE"),
              attention="eager", notes="transformers offers no SDPA for GPT-J",
              n_embd=32, n_layer=2, n_head=4, n_positions=256, rotary_dim=4),
        _arch("Falcon", "falcon", "FalconConfig", "FalconForCausalLM", ("fused qkv", "multi-query"),
              hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=True, parallel_attn=True,
              max_position_embeddings=256),
        _arch("OPT", "opt", "OPTConfig", "OPTForCausalLM", ("learned positions", "LayerNorm"),
              hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
              max_position_embeddings=256),
        _arch("BLOOM", "bloom", "BloomConfig", "BloomForCausalLM", ("ALiBi", "fused qkv"),
              attention="eager", notes="ALiBi from the 2-D mask", hidden_size=32, n_layer=2, n_head=4),
    ]


def unsupported() -> list[Arch]:
    """Architectures whose layers the engine cannot mask per row (refused at load time)."""
    L = _LLAMA_LIKE
    return [
        _arch("Llama-4 (chunked attention)", "llama4_text", "Llama4TextConfig", "Llama4ForCausalLM",
              ("chunked attention",), head_dim=8, attention_chunk_size=4, num_local_experts=2,
              layer_types=["chunked_attention", "full_attention"], **L),
        _arch("Qwen3-Next (linear attention)", "qwen3_next", "Qwen3NextConfig", "Qwen3NextForCausalLM",
              ("linear attention",), head_dim=8, layer_types=["linear_attention", "full_attention"],
              num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, **L),
    ]
