"""The worker runtime that prefill_worker/ and decode_worker/ share: the loaded model and its
engine thread, the KV store, admission, heartbeat and drain, metrics, and the app skeleton."""
