"""Behind the `Backend` seam: the protocol the API layer sees (backend.py) and the production
dispatcher over prefill/decode workers (disaggregated.py), with its pool, membership and faults."""
