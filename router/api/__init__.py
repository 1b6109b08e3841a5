"""The OpenAI endpoints: one module per endpoint (route, request-to-plan step, response
formatting), plus what they share (planning, respond, OpenAPI declarations)."""
