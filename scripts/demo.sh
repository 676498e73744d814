#!/usr/bin/env bash
# `make demo`: serve the default model (../shared/models/stories260K), answer a completion
# and a streamed chat completion through the official openai client, then stop the server.
set -euo pipefail
BIN=${BIN:-.venv/bin}
PORT=${PORT:-8000}
"$BIN/strata" serve --port "$PORT" --disable-uvicorn-access-log &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
"$BIN/python" - "$PORT" <<'PY'
import sys, time
import httpx
from openai import OpenAI

base = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(600):  # the first start on a machine also builds the C++ kernel
    try:
        if httpx.get(f"{base}/health", timeout=1).status_code == 200:
            break
    except httpx.HTTPError:
        time.sleep(0.5)
else:
    sys.exit("strata serve did not come up")
client = OpenAI(base_url=f"{base}/v1", api_key="none")
model = client.models.list().data[0].id
completion = client.completions.create(model=model, prompt="Once upon a time", max_tokens=48)
print("completion: Once upon a time" + completion.choices[0].text)
print("chat (streamed): ", end="")
stream = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "The little dog"}], max_tokens=48,
    stream=True)
for chunk in stream:
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
PY
