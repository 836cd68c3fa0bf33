"""`llmlab serve`: one loaded model behind an OpenAI-compatible HTTP API (plus llmlab's own
classify, render and generate), and the client side of `--server`. Layer: between commands and
learn (commands -> serving -> learn -> orchestration ...); fastapi and uvicorn load only here."""
