"""`tandem export-tokenizer DIR`: the served model's tokenizer as a plain Hugging Face folder.

For clients that need a local tokenizer path offline (lm-eval, vLLM's benchmark scripts,
`AutoTokenizer.from_pretrained(DIR)`): tokenizer.json, tokenizer_config.json (with the chat
template inlined) and chat_template.jinja. Only tokenizer files: no config, no weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from engine.registry import DEFAULT_MODEL

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# transformers 5 names its fast tokenizer class TokenizersBackend; older clients (4.x) only
# know PreTrainedTokenizerFast, which reads the same tokenizer.json.
_PORTABLE_CLASS = "PreTrainedTokenizerFast"


def register(sub) -> None:
    p = sub.add_parser(
        "export-tokenizer", help="write the model's tokenizer as a plain HF folder"
    )
    p.add_argument("dir", type=Path, help="output folder (created if missing)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="registry name, path or hub id")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="model_max_length to record (default: the model config, capped)")
    p.set_defaults(func=run)


def _make_portable(folder: Path, tokenizer: PreTrainedTokenizerBase, max_len: int) -> None:
    """Older transformers read the chat template from tokenizer_config.json only, and a huge
    model_max_length (the 1e30 sentinel) makes clients that truncate to it misbehave."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") in (None, "TokenizersBackend"):
        config["tokenizer_class"] = _PORTABLE_CLASS
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    config["model_max_length"] = max_len
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def export_tokenizer(model: str, folder: Path, max_model_len: int | None = None) -> list[str]:
    """Writes the folder; returns the file names in it."""
    from router.model_info import load_served_model  # transformers is slow to import

    served = load_served_model(model, max_model_len=max_model_len)
    folder.mkdir(parents=True, exist_ok=True)
    served.tokenizer.save_pretrained(folder)
    if served.tokenizer.chat_template and not (folder / "chat_template.jinja").exists():
        (folder / "chat_template.jinja").write_text(served.tokenizer.chat_template)
    _make_portable(folder, served.tokenizer, served.max_model_len)
    return sorted(p.name for p in folder.iterdir())


def run(args: argparse.Namespace) -> int:
    files = export_tokenizer(args.model, args.dir, args.max_model_len)
    print(f"wrote {', '.join(files)} to {args.dir}")  # the command's output, not a log line
    return 0
