#!/usr/bin/env python3
"""A running Shoal server, seen through the official `openai` Python package.

Usage: SHOAL_BASE_URL=http://127.0.0.1:PORT/v1 python3 tests/python/test_openai_client.py

Env:
  SHOAL_BASE_URL  the server's OpenAI base URL, ending in /v1 (required)
  SHOAL_MODEL     the model id to send (default: the first id /v1/models lists)
  SHOAL_API_KEY   the bearer token to send (default: "sk-test"; any works without a key)

The `openai` package is required (`pip install openai`): without it this script fails,
since a silent skip would let the API drift from what real clients expect. Error cases
are checked over raw HTTP (urllib), so status codes and the error body's shape are
seen exactly as sent.
"""

import json
import os
import sys
import unittest
import urllib.error
import urllib.request

try:
    import openai
except ImportError:
    sys.stderr.write(
        "FAILED: the `openai` Python package is not installed (pip install openai)\n"
    )
    sys.exit(1)

BASE_URL = os.environ.get("SHOAL_BASE_URL", "").rstrip("/")
if not BASE_URL:
    sys.stderr.write("FAILED: set SHOAL_BASE_URL, e.g. http://127.0.0.1:8080/v1\n")
    sys.exit(1)
ROOT_URL = BASE_URL[: -len("/v1")] if BASE_URL.endswith("/v1") else BASE_URL
API_KEY = os.environ.get("SHOAL_API_KEY", "sk-test")
TIMEOUT = 300

client = openai.OpenAI(base_url=BASE_URL, api_key=API_KEY, max_retries=0, timeout=TIMEOUT)


def model_id():
    return os.environ.get("SHOAL_MODEL") or client.models.list().data[0].id


MODEL = model_id()


def http(method, path, body=None, raw=None, root=False):
    """(status, parsed JSON or text, content type) of one request, errors included."""
    url = (ROOT_URL if root else BASE_URL) + path
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Bearer {API_KEY}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as res:
            status, ctype, text = res.status, res.headers.get("Content-Type", ""), res.read()
    except urllib.error.HTTPError as e:
        status, ctype, text = e.code, e.headers.get("Content-Type", ""), e.read()
    text = text.decode()
    try:
        return status, json.loads(text), ctype
    except ValueError:
        return status, text, ctype


def chat_args(content, **extra):
    args = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 16,
    }
    args.update(extra)
    return args


class Models(unittest.TestCase):
    def test_list(self):
        models = client.models.list()
        ids = [m.id for m in models.data]
        self.assertEqual(ids, [MODEL])
        self.assertEqual(models.data[0].object, "model")

    def test_retrieve(self):
        self.assertEqual(client.models.retrieve(MODEL).id, MODEL)

    def test_health_and_metrics(self):
        status, body, _ = http("GET", "/health", root=True)
        self.assertEqual((status, body), (200, {"status": "ok", "api_key_required": False}))
        status, text, ctype = http("GET", "/metrics", root=True)
        self.assertEqual(status, 200)
        self.assertIn("text", ctype)
        for name in (
            "shoal_requests_total",
            "shoal_prompt_tokens_total",
            "shoal_generated_tokens_total",
            "shoal_time_to_first_token_seconds",
            "shoal_requests_in_flight",
            "shoal_requests_queued",
        ):
            self.assertIn(name, text)


class Chat(unittest.TestCase):
    def test_whole(self):
        r = client.chat.completions.create(**chat_args("Name three colors."))
        self.assertEqual(r.object, "chat.completion")
        self.assertEqual(r.model, MODEL)
        self.assertTrue(r.id.startswith("chatcmpl-"))
        self.assertEqual(len(r.choices), 1)
        choice = r.choices[0]
        self.assertEqual(choice.message.role, "assistant")
        self.assertIsInstance(choice.message.content, str)
        self.assertTrue(choice.message.content)
        self.assertIn(choice.finish_reason, ("stop", "length"))
        self.assertGreater(r.usage.prompt_tokens, 0)
        self.assertGreater(r.usage.completion_tokens, 0)
        self.assertLessEqual(r.usage.completion_tokens, 16)
        self.assertEqual(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens)

    def test_streamed_with_usage_matches_whole(self):
        args = chat_args("Count from one to ten.")
        whole = client.chat.completions.create(**args)
        chunks = list(
            client.chat.completions.create(
                **args, stream=True, stream_options={"include_usage": True}
            )
        )
        self.assertGreaterEqual(len(chunks), 3)
        for c in chunks:
            self.assertEqual(c.object, "chat.completion.chunk")
            self.assertEqual(c.id, chunks[0].id)
        self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
        usage = chunks[-1]
        self.assertEqual(usage.choices, [])
        self.assertEqual(usage.usage.completion_tokens, whole.usage.completion_tokens)
        self.assertEqual(usage.usage.prompt_tokens, whole.usage.prompt_tokens)
        finishes = [c.choices[0].finish_reason for c in chunks[:-1]]
        self.assertEqual(finishes[-1], whole.choices[0].finish_reason)
        self.assertTrue(all(f is None for f in finishes[:-1]))
        text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
        self.assertEqual(text, whole.choices[0].message.content)

    def test_streamed_without_usage(self):
        chunks = list(client.chat.completions.create(**chat_args("Hello!"), stream=True))
        self.assertTrue(all(c.usage is None for c in chunks))
        self.assertTrue(all(len(c.choices) == 1 for c in chunks))
        self.assertIsNotNone(chunks[-1].choices[0].finish_reason)

    def test_greedy_is_deterministic(self):
        args = chat_args("Tell me a fact about the moon.", max_tokens=24)
        a = client.chat.completions.create(**args).choices[0].message.content
        b = client.chat.completions.create(**args).choices[0].message.content
        self.assertEqual(a, b)

    def test_the_next_turn_reports_its_cached_prompt(self):
        # The prompt cache: the second turn reuses the first turn's prompt and says so in
        # usage.prompt_tokens_details.cached_tokens, as OpenAI reports its own caching.
        system = {"role": "system", "content": "Answer in a few words. " * 20}
        first = [system, {"role": "user", "content": "Name a colour."}]
        r1 = client.chat.completions.create(
            model=MODEL, messages=first, max_tokens=8, temperature=0)
        second = first + [
            {"role": "assistant", "content": r1.choices[0].message.content},
            {"role": "user", "content": "Another one?"},
        ]
        r2 = client.chat.completions.create(
            model=MODEL, messages=second, max_tokens=8, temperature=0)
        cached = r2.usage.prompt_tokens_details.cached_tokens
        self.assertGreater(cached, r1.usage.prompt_tokens // 2, r2.usage)
        self.assertLess(cached, r2.usage.prompt_tokens)
        r3 = client.chat.completions.create(
            model=MODEL, messages=second, max_tokens=8, temperature=0,
            extra_body={"cache_prompt": False})
        self.assertEqual(r3.usage.prompt_tokens_details.cached_tokens, 0)
        self.assertEqual(r3.choices[0].message.content, r2.choices[0].message.content)

    def test_content_parts(self):
        args = chat_args("Say hi.")
        plain = client.chat.completions.create(**args).choices[0].message.content
        args["messages"] = [{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}]
        parts = client.chat.completions.create(**args).choices[0].message.content
        self.assertEqual(plain, parts)

    def test_max_tokens_gives_length(self):
        r = client.chat.completions.create(
            **chat_args("Write a long story about a dragon.", max_tokens=5)
        )
        self.assertEqual(r.choices[0].finish_reason, "length")
        self.assertEqual(r.usage.completion_tokens, 5)
        r = client.chat.completions.create(
            **chat_args("Write a long story about a dragon.", max_completion_tokens=3)
        )
        self.assertEqual(r.usage.completion_tokens, 3)

    def test_sampling_parameters_are_accepted(self):
        r = client.chat.completions.create(
            **chat_args("Hi!", max_tokens=8),
            top_p=0.9,
            seed=42,
            frequency_penalty=0.5,
            presence_penalty=0.5,
            extra_body={"top_k": 20, "min_p": 0.05, "repeat_penalty": 1.1, "unknown_field": 1},
        )
        self.assertTrue(r.choices[0].message.content)
        # A seed makes sampling reproducible too.
        args = chat_args("Invent a word.", temperature=1.0, seed=1234, max_tokens=12)
        a = client.chat.completions.create(**args).choices[0].message.content
        b = client.chat.completions.create(**args).choices[0].message.content
        self.assertEqual(a, b)


class SeveralChoices(unittest.TestCase):
    """`n` > 1: one choice per generation, indexed; greedy ones agree, seeded sampled ones
    are reproducible; usage counts the prompt once and every choice's tokens."""

    def test_chat(self):
        one = client.chat.completions.create(**chat_args("Name a colour."))
        three = client.chat.completions.create(**chat_args("Name a colour.", n=3))
        self.assertEqual([c.index for c in three.choices], [0, 1, 2])
        for c in three.choices:
            self.assertEqual(c.message.content, one.choices[0].message.content)
        self.assertEqual(three.usage.prompt_tokens, one.usage.prompt_tokens)
        self.assertEqual(three.usage.completion_tokens, 3 * one.usage.completion_tokens)

        args = chat_args("Write a word.", n=4, temperature=1.0, seed=11, max_tokens=8)
        a = client.chat.completions.create(**args)
        b = client.chat.completions.create(**args)
        texts = [c.message.content for c in a.choices]
        self.assertEqual(texts, [c.message.content for c in b.choices])
        self.assertGreater(len(set(texts)), 1, texts)
        # The first choice is the one `n` = 1 gives for the same seed.
        single = client.chat.completions.create(**{**args, "n": 1})
        self.assertEqual(single.choices[0].message.content, texts[0])

    def test_streamed(self):
        args = chat_args("Write a word.", n=3, temperature=1.0, seed=5, max_tokens=8)
        whole = client.chat.completions.create(**args)
        chunks = list(
            client.chat.completions.create(
                **args, stream=True, stream_options={"include_usage": True}
            )
        )
        texts = {}
        finishes = {}
        for c in chunks[:-1]:
            self.assertEqual(len(c.choices), 1)
            choice = c.choices[0]
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
        self.assertEqual(sorted(texts), [0, 1, 2])
        self.assertEqual([texts[i] for i in range(3)], [c.message.content for c in whole.choices])
        self.assertEqual([finishes[i] for i in range(3)], [c.finish_reason for c in whole.choices])
        self.assertEqual(chunks[-1].choices, [])
        self.assertEqual(chunks[-1].usage.completion_tokens, whole.usage.completion_tokens)

    def test_completions(self):
        r = client.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, n=2
        )
        self.assertEqual([c.index for c in r.choices], [0, 1])
        self.assertEqual(r.choices[0].text, r.choices[1].text)


class Logprobs(unittest.TestCase):
    """`logprobs` / `top_logprobs`: each token's log-probability under the model, as the
    OpenAI client parses them, the same whole and streamed."""

    def check_content(self, content, text, top):
        self.assertTrue(content)
        self.assertEqual("".join(t.token for t in content), text)
        for t in content:
            self.assertLessEqual(t.logprob, 0.0)
            self.assertEqual(bytes(t.bytes).decode("utf-8", "replace"), t.token)
            self.assertEqual(len(t.top_logprobs), top)
            if top:
                # Greedy: the token drawn is the likeliest, and the list is ordered.
                self.assertEqual(t.top_logprobs[0].token, t.token)
                self.assertAlmostEqual(t.top_logprobs[0].logprob, t.logprob, places=5)
                lps = [a.logprob for a in t.top_logprobs]
                self.assertEqual(lps, sorted(lps, reverse=True))
                self.assertLessEqual(sum(2.718281828 ** lp for lp in lps), 1.0 + 1e-4)

    def test_chat_whole_and_streamed(self):
        args = chat_args("Name three colors.", logprobs=True, top_logprobs=3)
        whole = client.chat.completions.create(**args)
        text = whole.choices[0].message.content
        content = whole.choices[0].logprobs.content
        self.check_content(content, text, 3)

        streamed = list(client.chat.completions.create(**args, stream=True))
        parts = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
        self.assertEqual([(t.token, t.logprob) for t in parts], [(t.token, t.logprob) for t in content])

        plain = client.chat.completions.create(**chat_args("Name three colors."))
        self.assertIsNone(plain.choices[0].logprobs)
        self.assertEqual(plain.choices[0].message.content, text)
        only = client.chat.completions.create(**chat_args("Name three colors.", logprobs=True))
        self.check_content(only.choices[0].logprobs.content, text, 0)

    def test_completions_legacy_shape(self):
        r = client.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=2
        )
        lp = r.choices[0].logprobs
        text = r.choices[0].text
        self.assertEqual("".join(lp.tokens), text)
        self.assertEqual(len(lp.token_logprobs), len(lp.tokens))
        self.assertEqual(lp.text_offset[0], 0)
        self.assertEqual(lp.text_offset[1:], [sum(len(t) for t in lp.tokens[:i]) for i in range(1, len(lp.tokens))])
        for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            self.assertEqual(len(top), 2)
            self.assertIn(token, top)
            self.assertAlmostEqual(max(top.values()), logprob, places=5)

    def test_bad_values_are_refused(self):
        for extra, param in (
            ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
            ({"top_logprobs": 2}, "top_logprobs"),
            ({"logprobs": 3}, "logprobs"),
        ):
            status, body, _ = http("POST", "/chat/completions", chat_args("hi", **extra))
            self.assertEqual(status, 400, body)
            self.assertEqual(body["error"]["param"], param, body)
        status, body, _ = http("POST", "/completions", {"model": MODEL, "prompt": "hi", "logprobs": 99})
        self.assertEqual(status, 400, body)
        self.assertEqual(body["error"]["param"], "logprobs", body)


class Completions(unittest.TestCase):
    def test_whole_and_streamed(self):
        args = dict(model=MODEL, prompt="The capital of France is", max_tokens=10, temperature=0)
        whole = client.completions.create(**args)
        self.assertEqual(whole.object, "text_completion")
        self.assertTrue(whole.id.startswith("cmpl-"))
        self.assertTrue(whole.choices[0].text)
        self.assertIn(whole.choices[0].finish_reason, ("stop", "length"))
        self.assertGreater(whole.usage.prompt_tokens, 0)
        chunks = list(
            client.completions.create(**args, stream=True, stream_options={"include_usage": True})
        )
        usage = chunks[-1]
        self.assertEqual(usage.choices, [])
        self.assertEqual(usage.usage.completion_tokens, whole.usage.completion_tokens)
        text = "".join(c.choices[0].text for c in chunks[:-1])
        self.assertEqual(text, whole.choices[0].text)
        self.assertEqual(chunks[-2].choices[0].finish_reason, whole.choices[0].finish_reason)

    def test_stop_strings(self):
        args = dict(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=20, temperature=0)
        free = client.completions.create(**args).choices[0].text
        self.assertIn(" 8", free)
        expected = free[: free.index(" 8")]
        for stop in (" 8", ["never", " 8"]):
            r = client.completions.create(**args, stop=stop)
            self.assertEqual(r.choices[0].text, expected)
            self.assertEqual(r.choices[0].finish_reason, "stop")
        streamed = client.completions.create(**args, stop=[" 8"], stream=True)
        self.assertEqual("".join(c.choices[0].text for c in streamed), expected)

    def test_stop_strings_in_chat(self):
        args = chat_args("List the numbers from 1 to 10, separated by commas.", max_tokens=40)
        free = client.chat.completions.create(**args).choices[0].message.content
        self.assertIn("5", free)
        r = client.chat.completions.create(**args, stop="5")
        self.assertEqual(r.choices[0].message.content, free[: free.index("5")])
        self.assertEqual(r.choices[0].finish_reason, "stop")


class Embeddings(unittest.TestCase):
    def test_create(self):
        texts = ["The quick brown fox jumps over the lazy dog.", "def add(a, b): return a + b"]
        # The client asks for base64 and decodes it; ask for floats too: the same vectors.
        r = client.embeddings.create(model=MODEL, input=texts)
        self.assertEqual([d.index for d in r.data], [0, 1])
        floats = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
        for a, b in zip(r.data, floats.data):
            self.assertEqual(len(a.embedding), len(b.embedding))
            for x, y in zip(a.embedding, b.embedding):
                self.assertAlmostEqual(x, y, places=6)
        first = floats.data[0].embedding
        self.assertAlmostEqual(sum(v * v for v in first), 1.0, places=4)
        self.assertGreater(r.usage.prompt_tokens, 10)
        self.assertEqual(r.usage.total_tokens, r.usage.prompt_tokens)
        self.assertEqual(r.model, MODEL)

    def test_bad_input(self):
        with self.assertRaises(openai.BadRequestError) as e:
            client.embeddings.create(model=MODEL, input=[])
        self.assertEqual(e.exception.body["param"], "input")
        with self.assertRaises(openai.BadRequestError):
            client.embeddings.create(model=MODEL, input="hi", dimensions=3)


class Errors(unittest.TestCase):
    def assertError(self, status, body, expected_status, code=None, param=None):
        self.assertEqual(status, expected_status, body)
        self.assertIsInstance(body, dict, body)
        error = body.get("error")
        self.assertIsInstance(error, dict, body)
        self.assertEqual(set(error), {"message", "type", "param", "code"}, body)
        self.assertIsInstance(error["message"], str)
        self.assertTrue(error["message"])
        self.assertIsInstance(error["type"], str)
        if code is not None:
            self.assertEqual(error["code"], code, body)
        if param is not None:
            self.assertEqual(error["param"], param, body)

    def test_malformed_json(self):
        status, body, _ = http("POST", "/chat/completions", raw=b'{"model": "x", "messages": [')
        self.assertError(status, body, 400)
        status, body, _ = http("POST", "/completions", raw=b"not json")
        self.assertError(status, body, 400)

    def test_missing_and_invalid_fields(self):
        status, body, _ = http("POST", "/chat/completions", {"model": MODEL})
        self.assertError(status, body, 400, param="messages")
        status, body, _ = http("POST", "/chat/completions", {"model": MODEL, "messages": "hi"})
        self.assertError(status, body, 400, param="messages")
        for n in (0, 17):
            status, body, _ = http("POST", "/chat/completions", chat_args("hi", n=n))
            self.assertError(status, body, 400, param="n")
        status, body, _ = http("POST", "/chat/completions", chat_args("hi", temperature=-1))
        self.assertError(status, body, 400, param="temperature")

    def test_max_tokens_out_of_range(self):
        for bad in (0, -5):
            status, body, _ = http("POST", "/chat/completions", chat_args("hi", max_tokens=bad))
            self.assertError(status, body, 400, param="max_tokens")
        status, body, _ = http(
            "POST", "/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0, "stream": True}
        )
        self.assertError(status, body, 400, param="max_tokens")

    def test_a_huge_max_tokens_is_clamped(self):
        # opencode and other agents ask for 32000 or more: cut to the room left, as
        # llama-server and Ollama do, instead of refusing.
        for limit in (32_000, 10_000_000):
            r = client.chat.completions.create(**chat_args("Say hi.", max_tokens=limit))
            self.assertIn(r.choices[0].finish_reason, ("stop", "length"))
            self.assertGreater(r.usage.completion_tokens, 0)

    def test_unknown_model(self):
        status, body, _ = http("POST", "/chat/completions", chat_args("hi", model="gpt-404"))
        self.assertError(status, body, 404, code="model_not_found", param="model")
        with self.assertRaises(openai.NotFoundError):
            client.chat.completions.create(**chat_args("hi", model="gpt-404"))

    def test_prompt_longer_than_context(self):
        long = "hello " * 40_000
        status, body, _ = http("POST", "/chat/completions", chat_args(long))
        self.assertError(status, body, 400, code="context_length_exceeded")
        status, body, _ = http("POST", "/completions", {"model": MODEL, "prompt": long, "stream": True})
        self.assertError(status, body, 400, code="context_length_exceeded")
        with self.assertRaises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt=long)

    def test_unknown_route(self):
        status, body, _ = http("GET", "/nothing-here")
        self.assertError(status, body, 404)


if __name__ == "__main__":
    print(f"testing {BASE_URL} with openai {openai.__version__}, model {MODEL}", flush=True)
    result = unittest.main(verbosity=2, exit=False).result
    sys.exit(0 if result.wasSuccessful() and result.testsRun > 0 else 1)
