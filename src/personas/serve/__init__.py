"""Answering requests from a resident model: the thread that owns an engine and recovers from a
failed step (worker), the JSONL server on stdin/stdout (stdio), the OpenAI-compatible HTTP
server (http) and the chat-completions protocol it speaks (openai)."""
