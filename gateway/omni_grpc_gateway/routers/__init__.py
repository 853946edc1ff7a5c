"""One router per resource, as in vLLM's OpenAI server."""
