"""Issue 16's speed figure: a DAG in one POST /v1/dag against a client running the same nodes
one by one (each rendered with its parents' text, in topological order), on `tandem serve
--model A --model B` (one prefill and one decode worker per model), in one run.

    .venv/bin/python scripts/bench_dag.py [--rounds 3] [--max-tokens 32] [--dtype auto]

The DAG is the e2e test's shape: a ~1,000-token system prompt shared by three nodes of each
model, a chain of three across both models, and a join. Each measurement gets its own
`cache_salt`, so both start cold and both reuse the prefix within their own run; the two modes
alternate which goes first. Reports wall times, their ratio (goal: <= 0.6x) and the prompt
tokens each model's workers computed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.serving_targets import cpu_flags, default_dtype, tandem_serve  # noqa: E402
from workflow.dag import DAG  # noqa: E402

A = "HuggingFaceTB/SmolLM2-135M-Instruct"
B = "SmolLM2-135M-Instruct-int8r"
SYSTEM = "Reference sheet for the quiz below.\n" + "".join(
    f"Fact {i}: station {i} of the northern line opened in {1850 + 3 * i} and serves "
    f"{1000 + 37 * i} passengers a day.\n" for i in range(40))


def quiz(q: str) -> str:
    return f"{SYSTEM}\nQuestion: {q}\nAnswer:"


def workload() -> DAG:
    dag = DAG()
    for i, q in enumerate(["When did station 3 open?", "How busy is station 7?",
                           "Which station opened in 1880?"]):
        dag.add_node(f"a{i}", quiz(q))
        dag.add_node(f"b{i}", quiz(q), model=B)
    dag.add_node("c1", quiz("Name the busiest station."))
    dag.add_node("c2", "Improve this answer: {{c1}}\nBetter answer:", model=B)
    dag.add_node("c3", "Say it in three words: {{c2}}\nThree words:")
    dag.add_node("join", "One says {{a0}} and the other says {{b0}}. Together:", model=B)
    return dag


def computed(http: httpx.Client, url: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for w in http.get(f"{url}/workers").json()["workers"]:
        counters = http.get(f"{w['url']}/health").json()["counters"]
        out[w["model"]] = out.get(w["model"], 0) + counters["prompt_tokens_computed_total"]
    return out


def run_dag(http: httpx.Client, url: str, dag: DAG, fields: dict, salt: str) -> dict[str, str]:
    nodes = [{"id": n.id, "prompt": n.prompt, "depends_on": list(n.depends_on),
              **({"model": n.model} if n.model else {}), **fields} for n in dag.nodes]
    r = http.post(f"{url}/v1/dag", json={"nodes": nodes, "cache_salt": salt})
    r.raise_for_status()
    return {n["id"]: n["text"] for n in r.json()["nodes"]}


def run_serial(http: httpx.Client, url: str, dag: DAG, fields: dict, salt: str
               ) -> dict[str, str]:
    text: dict[str, str] = {}
    for node in dag.validate():
        r = http.post(f"{url}/v1/completions", json={
            "model": node.model or A, "prompt": node.rendered(text).prompt,
            "cache_salt": salt, **fields})
        r.raise_for_status()
        text[node.id] = r.json()["choices"][0]["text"]
    return text


def measure(http, url, mode: str, dag: DAG, fields: dict, salt: str) -> tuple[float, dict, dict]:
    before = computed(http, url)
    start = time.perf_counter()
    text = (run_dag if mode == "dag" else run_serial)(http, url, dag, fields, salt)
    wall = time.perf_counter() - start
    after = computed(http, url)
    return wall, {m: after[m] - before.get(m, 0) for m in after}, text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--colocated", action="store_true", help="one worker per model")
    args = ap.parse_args()
    dtype = default_dtype() if args.dtype == "auto" else args.dtype
    fields = {"max_tokens": args.max_tokens, "temperature": 0}
    dag = workload()
    walls: dict[str, list[float]] = {"dag": [], "serial": []}
    spent: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp, httpx.Client(timeout=600) as http:
        work = Path(tmp)
        flags = ["--model", A, "--model", B] + (["--colocated"] if args.colocated else [])
        server = tandem_serve("tandem-dag", work, work / "kv", *flags, dtype=dtype)
        with server:
            # Warm-up, unmeasured: each worker's first forwards pay one-time setup.
            measure(http, server.url, "dag", dag, fields, "bench-warmup")
            for r in range(args.rounds):
                modes = ["dag", "serial"] if r % 2 == 0 else ["serial", "dag"]
                texts = {}
                for mode in modes:
                    wall, spent[mode], texts[mode] = measure(http, server.url, mode, dag,
                                                             fields, f"bench-{r}-{mode}")
                    walls[mode].append(wall)
                same = texts["dag"] == texts["serial"]
                print(f"round {r + 1}: dag {walls['dag'][-1]:.2f} s, serial "
                      f"{walls['serial'][-1]:.2f} s, same text: {same}", flush=True)
    med = {m: statistics.median(w) for m, w in walls.items()}
    print(f"\nCPU flags: {' '.join(cpu_flags()) or 'none'}; dtype {dtype}; "
          f"{len(dag)} nodes, max_tokens {args.max_tokens}, median of {args.rounds} rounds\n")
    print("| mode | wall s (median) | prompt tokens computed, A / B (last round) |")
    print("|---|---|---|")
    for mode in ("serial", "dag"):
        print(f"| {mode} | {med[mode]:.2f} | {spent[mode].get(A, 0)} / {spent[mode].get(B, 0)} |")
    print(f"\nDAG / serial: {med['dag'] / med['serial']:.2f}x (goal <= 0.6x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
