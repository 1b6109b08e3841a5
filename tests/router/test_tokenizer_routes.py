"""/tokenize, /detokenize, /tokenizer_info, and `tandem export-tokenizer`."""

from __future__ import annotations

import json

from transformers import AutoTokenizer

from tandem.cli import main
from tests.router.conftest import MAX_MODEL_LEN, MODEL
from tests.router.helpers import USER


def test_tokenize_prompt(client, tokenizer):
    r = client.post("/tokenize", json={"model": MODEL, "prompt": "héllo 😀"})
    ids = tokenizer.encode("héllo 😀")
    assert r.json() == {"count": len(ids), "max_model_len": MAX_MODEL_LEN, "tokens": ids,
                        "token_strs": None}


def test_tokenize_chat_matches_what_chat_sends(client, fake):
    toks = client.post("/tokenize", json={"messages": USER}).json()["tokens"]
    client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER})
    assert toks == fake.requests[0].token_ids


def test_token_strs(client):
    body = client.post("/tokenize", json={"prompt": "a 😀", "return_token_strs": True}).json()
    assert body["token_strs"][0] == "a" and body["token_strs"][-1].startswith("bytes:")


def test_detokenize_round_trip(client, tokenizer):
    ids = tokenizer.encode("中文 and more")
    assert client.post("/detokenize", json={"model": MODEL, "tokens": ids}).json() == {
        "prompt": "中文 and more"}


def test_tokenizer_info(client):
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>" and info["eos_token_ids"] == [2]
    assert info["max_model_len"] == MAX_MODEL_LEN and "<|im_start|>" in info["chat_template"]
    assert info["tokenizer_class"]
    assert client.get("/tokenizer_info", params={"model": "x"}).status_code == 404


def test_export_tokenizer(tmp_path, default_folder, tokenizer, capsys):
    out = tmp_path / "tok"
    assert main(["export-tokenizer", str(out), "--model", str(default_folder),
                 "--max-model-len", "1024"]) == 0
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= {
        p.name for p in out.iterdir()}
    assert not list(out.glob("*.safetensors"))
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_max_length"] == 1024 and config["chat_template"]
    again = AutoTokenizer.from_pretrained(out)
    assert again.encode("héllo 😀") == tokenizer.encode("héllo 😀")
    assert again.apply_chat_template(USER, tokenize=False) == tokenizer.apply_chat_template(
        USER, tokenize=False)
