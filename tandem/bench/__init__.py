"""`tandem bench`: a serving benchmark client for any OpenAI-compatible endpoint.

    workloads.py  seeded request plans (random, shared-prefix, multi-turn)
    sse.py        pure parsing of an OpenAI SSE stream into a RequestRecord
    client.py     one httpx.AsyncClient: model discovery and timed streaming requests
    runner.py     sessions, concurrency limit, Poisson arrivals, request and time bounds
    stats.py      percentiles, throughput, goodput, cached-token share
    report.py     JSON document and markdown tables
    plot.py       PNG charts (matplotlib, only with --plot)
"""
