"""`tandem generate` prints exactly the engine's text on stdout, for --prompt and --chat."""

from __future__ import annotations

from engine.engine import Engine
from tandem.cli import main
from tests.engine.helpers import greedy, run_one


def _expected(loaded, ids: list[int], n: int) -> str:
    tokens = run_one(Engine(loaded), ids, greedy(n)).tokens
    return loaded.tokenizer.decode(tokens, skip_special_tokens=True) + "\n"


def test_prompt_raw_text(tiny_folder, tiny_fp32, capsys):
    assert main(["generate", "--model", str(tiny_folder), "--dtype", "float32",
                 "--prompt", "Hello there", "--max-tokens", "6"]) == 0
    ids = tiny_fp32.tokenizer("Hello there").input_ids
    assert capsys.readouterr().out == _expected(tiny_fp32, ids, 6)


def test_chat_uses_template_and_env_model(tiny_folder, tiny_fp32, capsys, monkeypatch):
    monkeypatch.setenv("TANDEM_MODEL", str(tiny_folder))
    assert main(["generate", "--chat", "Hi!", "--max-tokens", "5", "--dtype", "float32"]) == 0
    enc = tiny_fp32.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi!"}], add_generation_prompt=True, tokenize=True)
    out = capsys.readouterr()
    assert out.out == _expected(tiny_fp32, list(enc["input_ids"]), 5)
    assert "finish_reason" in out.err  # logs go to stderr
