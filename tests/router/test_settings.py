"""RouterSettings: defaults, API keys from env/flags, and the served model's limits."""

from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

from router.model_info import load_served_model
from router.settings import RouterSettings
from tandem.flags import add_settings_args, settings_from_args


def test_defaults_bind_loopback(monkeypatch):
    s = RouterSettings(_env_file=None)
    assert (s.host, s.port, s.api_keys, s.max_model_len) == ("127.0.0.1", 8000, [], None)


def test_api_keys_from_env_comma_or_json(monkeypatch):
    monkeypatch.setenv("TANDEM_API_KEYS", "k1, k2")
    assert RouterSettings(_env_file=None).api_keys == ["k1", "k2"]
    monkeypatch.setenv("TANDEM_API_KEYS", '["k,3", "k4"]')
    assert RouterSettings(_env_file=None).api_keys == ["k,3", "k4"]


def test_api_key_flag_repeats():
    parser = argparse.ArgumentParser()
    add_settings_args(parser, RouterSettings)
    args = parser.parse_args(["--api-key", "a", "--api-key", "b,c", "--port", "9000"])
    s = settings_from_args(RouterSettings, args)
    assert s.api_keys == ["a", "b", "c"] and s.port == 9000


def test_max_model_len_from_config(default_folder):
    model = load_served_model(str(default_folder), served_name="m")
    assert model.max_model_len == 8192  # SmolLM2's config, within the cap
    assert model.eos_token_ids == frozenset({2})
    assert model.vocab_size == 49152 and model.name == "m"


def test_limits_default_to_the_schema_caps_and_only_lower_them(monkeypatch):
    s = RouterSettings(_env_file=None)
    assert (s.max_n, s.max_prompts, s.max_stop_strings, s.max_logit_bias, s.max_logprobs,
            s.max_messages) == (128, 2048, 4, 1024, 20, 2048)
    assert s.max_body_bytes == 8 * 2**20
    with pytest.raises(ValidationError):
        RouterSettings(_env_file=None, max_n=129)
    monkeypatch.setenv("TANDEM_MAX_BODY_BYTES", "65536")
    assert RouterSettings(_env_file=None).max_body_bytes == 65536
