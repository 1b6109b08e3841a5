"""A two-model cascade: one model drafts, a second refines the draft, the first sums it up.

    .venv/bin/python examples/cascade.py                 # in process (tandem.LLM)
    .venv/bin/python examples/cascade.py --url http://127.0.0.1:8000   # against tandem serve
        # started with: tandem serve --model HuggingFaceTB/SmolLM2-135M-Instruct \
        #                            --model SmolLM2-135M-Instruct-int8r

No second real model is available offline, so the drafter is the registry's derived model
`SmolLM2-135M-Instruct-int8r` (the default model with int8-rounded projection weights;
configs/models.toml) and the refiner is the default model. With a hub, put any two models in
DRAFTER and REFINER: the DAG does not change.
"""

from __future__ import annotations

import argparse

from tandem import DAG, LLM, Client, SamplingParams

DRAFTER = "SmolLM2-135M-Instruct-int8r"
REFINER = "HuggingFaceTB/SmolLM2-135M-Instruct"
BRIEF = "You are a copywriter for a small bakery."


def cascade(topic: str) -> DAG:
    def chat(text: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": BRIEF}, {"role": "user", "content": text}]

    return (DAG()
            .add_node("draft", messages=chat(f"Write a two-sentence announcement: {topic}."),
                      model=DRAFTER)
            .add_node("refine", messages=chat("Here is a draft announcement: {{draft}}\nWrite "
                                              "a longer, more exciting version that invites "
                                              "customers to visit."), model=REFINER)
            .add_node("summary", messages=chat("Summarize this in one short sentence: "
                                               "{{refine}}"), model=DRAFTER))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="run against this tandem serve instead of in process")
    ap.add_argument("--topic", default="our new rye loaf is out on Friday")
    args = ap.parse_args()
    params = SamplingParams(temperature=0, max_tokens=80)
    dag = cascade(args.topic)
    if args.url:
        with Client(args.url) as client:
            outputs = client.generate(dag, params)
    else:
        outputs = LLM([REFINER, DRAFTER]).generate(dag, params)
    for out in outputs:
        print(f"--- {out.seq_id} ({out.model}, {out.num_cached_tokens} prompt tokens "
              f"reused)\n{out.text}\n")


if __name__ == "__main__":
    main()
