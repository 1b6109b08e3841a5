"""Engine test helpers: prompts, request builders, a driver loop, HF reference outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.engine import Engine
from engine.kv_layout import KVLayout
from engine.page_pool import PagePool
from engine.sampling_params import SamplingParams
from engine.sequence import SeqRequest, TokenEvent

_LONG = (
    "The history of the lighthouse at the edge of the northern cape begins with a shipwreck. "
    "In the winter of 1841 a merchant vessel carrying timber and salt ran aground on the rocks "
    "below the cliffs, and nineteen sailors were lost in a single night. The villagers, who had "
    "watched the ship's lanterns disappear into the storm, petitioned the harbour authority for "
    "a light. It took eleven years, two surveys and a change of government before the first "
    "stones were laid. The builders quarried granite from the hills behind the village, hauled "
    "it by ox cart along a track that still exists as a footpath, and raised the tower in three "
    "summers. The lamp itself came from a workshop in Paris: a first-order Fresnel lens, taller "
    "than a man, assembled from hundreds of prisms of polished glass. The first keeper was a "
    "former fisherman named Tomas Reyes, who kept a logbook of every ship he saw, every storm, "
    "and every repair. His entries are terse but vivid. On one page he records a whale beached "
    "in the cove; on another, the night the oil froze and he kept the flame alive with his own "
    "coat. When the light was automated in 1967, the last keeper locked the door, left the keys "
    "with the postmistress, and moved inland. Today the tower is a museum, and visitors climb "
    "the one hundred and twelve steps to stand where the keepers stood and look out over"
)

# Eight prompts of varied lengths; the last is ~300 tokens (several 64-token blocks).
PROMPTS = [
    "Hello",
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived",
    "Here is a list of the planets of the solar system, in order from the sun:",
    "Q: What is the boiling point of water at sea level, in degrees Celsius?\nA:",
    "In machine learning, a transformer is a neural network architecture that",
    _LONG,
]


def greedy(max_tokens: int = 16, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def make_request(seq_id: str, ids: list[int], params: SamplingParams, **kw) -> SeqRequest:
    return SeqRequest(seq_id, list(ids), len(ids), params, **kw)


@dataclass(slots=True)
class Result:
    tokens: list[int] = field(default_factory=list)
    events: list[TokenEvent] = field(default_factory=list)

    @property
    def finish_reason(self) -> str | None:
        return self.events[-1].finish_reason if self.events else None


def run(
    engine: Engine,
    requests: list[SeqRequest],
    joins: dict[int, list[SeqRequest]] | None = None,
    max_steps: int = 10_000,
) -> dict[str, Result]:
    """Add `requests`, then step until idle; `joins[k]` are added before step k."""
    joins = dict(joins or {})
    out: dict[str, Result] = {}
    for req in requests:
        engine.add(req)
    step = 0
    while engine.has_work() or any(k >= step for k in joins):
        for req in joins.pop(step, []):
            engine.add(req)
        for ev in engine.step():
            r = out.setdefault(ev.seq_id, Result())
            r.tokens.append(ev.token_id)
            r.events.append(ev)
        step += 1
        assert step < max_steps, "engine did not finish"
    return out


def run_one(engine: Engine, ids: list[int], params: SamplingParams) -> Result:
    return run(engine, [make_request("solo", ids, params)])["solo"]


def hf_greedy(loaded, ids: list[int], new_tokens: int, top: int = 5):
    """HF generate() greedy: (tokens up to and including EOS, per-step raw top-k logprobs)."""
    with torch.inference_mode():
        out = loaded.model.generate(
            torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(ids):].tolist()
    lps = [step[0].float().log_softmax(-1) for step in out.logits]
    eos = loaded.model.generation_config.eos_token_id
    if eos in tokens:
        tokens = tokens[: tokens.index(eos) + 1]
    tops = [lp.topk(top) for lp in lps[: len(tokens)]]
    return tokens, [(v.tolist(), i.tolist()) for v, i in tops], lps[: len(tokens)]


def page_bytes(loaded, page_size: int = 16) -> int:
    """Bytes of one KV page of `loaded` at the default layout (for kv_cache_bytes budgets)."""
    return PagePool.page_bytes(KVLayout.from_config(loaded.config, 64, loaded.dtype), page_size)


def close_by_top5(got_events, ref_tokens, ref_lps) -> None:
    """vLLM's check: identical until the first mismatch, where each token is in the other's
    top-5; after that the two continuations are unrelated and not compared."""
    for j, (ev, want) in enumerate(zip(got_events, ref_tokens, strict=False)):
        if ev.token_id == want:
            continue
        ref_top5 = ref_lps[j].topk(5).indices.tolist()
        got_top5 = [t for t, _ in ev.top_logprobs]
        assert ev.token_id in ref_top5 and want in got_top5, (j, ev.token_id, want)
        return
