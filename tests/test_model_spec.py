import json

import pytest

from rdu.base import UserError
from rdu.socket_actor.model_spec import ModelSpec, load_model, model_presets

# parameter counts published with each model (rounded); the emulator derives them from config.json
PUBLISHED_PARAMS = {
    "llama-2-7b": 6.74e9, "llama-2-70b": 68.98e9, "llama-3.1-8b": 8.03e9, "llama-3.1-70b": 70.55e9,
    "llama-3.1-405b": 405.85e9, "mistral-7b": 7.24e9, "falcon-40b": 41.3e9, "bloom-176b": 176.25e9,
}


def test_llama_2_7b_parameters_and_bytes():
    model = load_model("llama-2-7b")
    assert round(model.params() / 1e9, 2) == 6.74
    assert round(model.weight_bytes() / 1e9, 2) == 13.48


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_presets_match_published_sizes(name):
    assert load_model(name).params() == pytest.approx(PUBLISHED_PARAMS[name], rel=0.005)


def test_every_preset_is_listed():
    assert set(model_presets()) == set(PUBLISHED_PARAMS)


def test_families_are_recognised():
    assert load_model("falcon-40b").parallel_attention
    assert load_model("bloom-176b").position == "alibi"
    assert load_model("mistral-7b").sliding_window == 4096
    assert load_model("llama-2-70b").num_kv_heads == 8


def test_user_config_json(tmp_path):
    config = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 512, "vocab_size": 1000}
    path = tmp_path / "tiny" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(config))
    model = load_model(str(path))
    assert model.name == "tiny"
    layer = 256 * (4 + 2 * 2) * 64 + 4 * 64 * 256 + 3 * 256 * 512 + 2 * 256
    assert model.params() == 2 * 1000 * 256 + 2 * layer + 256


def test_missing_field_names_it(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 256}))
    with pytest.raises(UserError, match=r"config.json: num_attention_heads: missing field \(any of: num_attention_heads, n_head\)"):
        load_model(str(path))


def test_bad_json_names_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama",\n "hidden_size": }')
    with pytest.raises(UserError, match=r"line 2: not valid JSON"):
        load_model(str(path))


def test_unknown_model_lists_presets():
    with pytest.raises(UserError, match="unknown model 'gpt-9'.*llama-2-7b"):
        load_model("gpt-9")


def test_heads_must_divide_hidden():
    with pytest.raises(UserError, match="hidden size 100 is not a multiple"):
        ModelSpec.from_hf_config({"model_type": "llama", "hidden_size": 100, "num_hidden_layers": 1,
                                  "num_attention_heads": 3, "intermediate_size": 8, "vocab_size": 8}, "x", "x.json")
