"""What the services share, below all of them: the internal wire models, the worker ad in
Redis, the settings fields every process reads, and HTTP request counting."""
