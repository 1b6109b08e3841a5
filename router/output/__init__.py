"""From backend token events to client text: detokenizer, stop strings, logprobs, choice
state, collection, merging and SSE."""
