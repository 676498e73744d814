"""The official openai client against a live `strata serve`: same text as the offline LLM."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI

from strata import SamplingParams
from tests.server_process import SERVED_NAME

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def client(strata_server) -> OpenAI:
    return OpenAI(base_url=f"{strata_server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def offline(stories_llm):
    def generate(prompt, **params) -> str:
        out = stories_llm.generate(prompt, SamplingParams(temperature=0.0, **params),
                                   use_tqdm=False)
        return out[0].outputs[0]

    return generate


def test_completion_matches_offline(client, offline):
    response = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=40,
                                         temperature=0)
    expected = offline(PROMPT, max_tokens=40)
    assert response.choices[0].text == expected.text
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == len(expected.token_ids) == 40
    assert response.usage.prompt_tokens == 5  # BOS + 4 tokens


def test_streamed_completion_matches_offline(client, offline):
    stream = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=40,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == offline(PROMPT, max_tokens=40).text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40


def test_chat_matches_offline(client, offline):
    # stories260K has no chat template: the fallback renders the message's content alone.
    messages = [{"role": "user", "content": PROMPT}]
    response = client.chat.completions.create(model=SERVED_NAME, messages=messages,
                                              max_completion_tokens=30, temperature=0)
    expected = offline(PROMPT, max_tokens=30).text
    assert response.choices[0].message.content == expected
    assert response.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=30,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_string_and_finish_reason(client, offline):
    full = offline(PROMPT, max_tokens=40).text
    stop = full.split()[3]  # a word from the middle of the greedy text
    response = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=40,
                                         temperature=0, stop=[stop])
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == full[:full.index(stop)]
    streamed = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=40,
                                         temperature=0, stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == choice.text


def test_token_id_prompts_n_and_echo(strata_server, stories_llm, offline):
    ids = stories_llm.get_tokenizer().encode(PROMPT)
    body = {"model": SERVED_NAME, "prompt": [ids, ids[:3]], "max_tokens": 8, "temperature": 0,
            "n": 2}
    response = httpx.post(f"{strata_server.url}/v1/completions", json=body, timeout=60).json()
    choices = sorted(response["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert choices[0]["text"] == choices[1]["text"] == offline(PROMPT, max_tokens=8).text
    assert response["usage"]["prompt_tokens"] == len(ids) + 3
    assert response["usage"]["completion_tokens"] == 4 * 8
    echoed = httpx.post(f"{strata_server.url}/v1/completions", timeout=60, json={
        "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "echo": True}).json()
    assert echoed["choices"][0]["text"] == PROMPT + offline(PROMPT, max_tokens=4).text


def test_logprobs_shapes(client):
    response = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=5,
                                         temperature=0, logprobs=3)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 5
    assert all(len(top) >= 3 for top in logprobs.top_logprobs)
    # Greedy: the sampled token is the most likely one.
    assert all(lp == max(top.values()) for lp, top in
               zip(logprobs.token_logprobs, logprobs.top_logprobs))
    chat = client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": PROMPT}], max_tokens=5,
        temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == t.top_logprobs[0].logprob for t in content)


def test_seeded_sampling_is_reproducible(client):
    def sample():
        return client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=20,
                                         temperature=1.0, seed=1234,
                                         extra_body={"top_k": 40, "min_p": 0.01}).choices[0].text

    assert sample() == sample()


def test_context_length_error_is_the_offline_one(strata_server, stories_llm):
    """One rule in one place: the server's 400 says what LLM.generate raises."""
    prompt = [1] + [300] * 499
    with pytest.raises(ValueError) as offline:
        stories_llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=20),
                             use_tqdm=False)
    message = str(offline.value)
    assert "you requested 520 tokens (500 in the prompt, 20 in the completion)" in message
    response = httpx.post(f"{strata_server.url}/v1/completions", timeout=60, json={
        "model": SERVED_NAME, "prompt": prompt, "max_tokens": 20})
    assert response.status_code == 400 and response.json()["error"]["message"] == message
    chat = httpx.post(f"{strata_server.url}/v1/chat/completions", timeout=60, json={
        "model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 600})
    assert chat.status_code == 400
    assert "maximum context length is 512 tokens" in chat.json()["error"]["message"]


def test_models_tokenize_detokenize_version(strata_server, client, stories_llm):
    models = client.models.list()
    assert [m.id for m in models.data] == [SERVED_NAME]
    url = strata_server.url
    tokens = httpx.post(f"{url}/tokenize", json={"prompt": PROMPT}).json()
    assert tokens["tokens"] == stories_llm.get_tokenizer().encode(PROMPT)
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 512
    text = httpx.post(f"{url}/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text["prompt"] == PROMPT
    assert httpx.get(f"{url}/version").json()["version"]
