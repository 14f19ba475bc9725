"""Model loading: local directories, GGUF files, dtype, random-weight presets, clear errors."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import STORIES

from personalign.views.loading import RANDOM_PRESETS, load_model, resolve_model


def test_local_directory_and_dtype(stories):
    lm = load_model(str(STORIES), dtype="bfloat16")
    assert lm.model.dtype == torch.bfloat16 and lm.gguf_file is None
    assert stories.model.dtype == torch.float32
    assert len(lm.tokenizer) == 512


def test_saved_tiny_model_round_trip(tmp_path, tiny_lm, tiny_tokenizer):
    tiny_lm.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), dtype="float32")
    ids = torch.tensor([[1, 8, 9]])
    assert torch.allclose(lm.model(ids).logits, tiny_lm(ids).logits)


def test_gguf_file_resolution(smollm2):
    assert smollm2.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    path, gguf = resolve_model("smollm2")
    assert resolve_model(f"{path}/{gguf}") == (path, gguf)  # a .gguf path splits into dir + file
    assert smollm2.tokenizer.chat_template


def test_missing_path_and_bad_options(tmp_path):
    with pytest.raises(ValueError, match="`model` path './nope' does not exist"):
        load_model("./nope")
    with pytest.raises(ValueError, match="`gguf_file` 'x.gguf' is not a file"):
        resolve_model(str(tmp_path), "x.gguf")
    with pytest.raises(ValueError, match="`dtype` must be one of"):
        load_model(str(STORIES), dtype="float8")


def test_hub_id_offline_is_a_clear_error():
    # no network here: the hub id is passed to from_pretrained and its failure is reported by name
    with pytest.raises(ValueError, match="could not load `model` 'someorg/somemodel'"):
        load_model("someorg/somemodel")


def test_random_weight_preset_shapes():
    cfg = RANDOM_PRESETS["llama3-8b"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (4096, 32, 128256)
    with pytest.raises(ValueError, match="preset"):
        load_model("not-a-preset", random_weights=True)


def test_local_path_errors_say_what_is_wrong(tmp_path, tiny_lm, tiny_tokenizer):
    """A directory without config.json, a directory of GGUF files only, a file that is no model: each
    error names the field and what the path lacks (not a hub-id message from huggingface_hub)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"`model` directory '.*empty' has no config.json"):
        load_model(str(empty))
    ggufs = tmp_path / "ggufs"
    ggufs.mkdir()
    (ggufs / "a.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"holds GGUF files \['a.gguf'\] and no config.json: pass the file"):
        load_model(str(ggufs))


def test_reward_model_path_errors(tmp_path, tiny_lm, tiny_tokenizer):
    from personalign.views.reward import load_reward_model

    with pytest.raises(ValueError, match=r"`reward_model` path '/nonexistent/rm' does not exist; expected a reward"):
        load_reward_model("/nonexistent/rm")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"`reward_model` '.*file.bin' is a file"):
        load_reward_model(str(tmp_path / "file.bin"))
    with pytest.raises(ValueError, match="has no config.json"):
        load_reward_model(str(tmp_path))
    tiny_lm.save_pretrained(tmp_path / "lm")
    tiny_tokenizer.save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match=r"is a LlamaForCausalLM checkpoint, not a reward model .* `personalign train rm`"):
        load_reward_model(str(tmp_path / "lm"))
