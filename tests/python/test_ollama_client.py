#!/usr/bin/env python3
"""A running Shoal server, seen through the official `ollama` Python package.

Usage: SHOAL_OLLAMA_HOST=http://127.0.0.1:PORT python3 tests/python/test_ollama_client.py

Env:
  SHOAL_OLLAMA_HOST  the server's root URL, as OLLAMA_HOST would be (required)
  SHOAL_MODEL        the model name to send (default: the first name /api/tags lists)
  SHOAL_API_KEY      a bearer token to send (default: none; any works without a key)

The `ollama` package is required (`pip install ollama`): without it this script fails,
since a silent skip would let the API drift from what real clients expect. Error bodies
are checked over raw HTTP (urllib) as well, so their shape is seen exactly as sent.
"""

import importlib.metadata
import json
import os
import sys
import unittest
import urllib.error
import urllib.request

try:
    import ollama
except ImportError:
    sys.stderr.write(
        "FAILED: the `ollama` Python package is not installed (pip install ollama)\n"
    )
    sys.exit(1)

HOST = os.environ.get("SHOAL_OLLAMA_HOST", "").rstrip("/")
if not HOST:
    sys.stderr.write("FAILED: set SHOAL_OLLAMA_HOST, e.g. http://127.0.0.1:8080\n")
    sys.exit(1)
API_KEY = os.environ.get("SHOAL_API_KEY")
TIMEOUT = 300

headers = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else None
client = ollama.Client(host=HOST, timeout=TIMEOUT, headers=headers)

MODEL = os.environ.get("SHOAL_MODEL") or client.list().models[0].model
GREEDY = {"temperature": 0, "num_predict": 24}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city"}},
            "required": ["city"],
        },
    },
}


def http(method, path, body=None, raw=None):
    """(status, parsed JSON or text) of one request, errors included."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(HOST + path, data=data, method=method)
    if API_KEY:
        req.add_header("Authorization", f"Bearer {API_KEY}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as res:
            status, text = res.status, res.read()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read()
    text = text.decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def assert_totals(test, last):
    test.assertTrue(last.done)
    test.assertIn(last.done_reason, ("stop", "length"))
    test.assertGreater(last.prompt_eval_count, 0)
    test.assertGreater(last.eval_count, 0)
    test.assertGreater(last.total_duration, 0)
    test.assertGreaterEqual(last.eval_duration, 0)
    test.assertGreaterEqual(last.prompt_eval_duration, 0)


class Models(unittest.TestCase):
    def test_version(self):
        self.assertTrue(client._client.get("/api/version").json()["version"])

    def test_list(self):
        models = client.list().models
        self.assertEqual(len(models), 1)
        m = models[0]
        self.assertEqual(m.model, MODEL)
        self.assertEqual(m.details.format, "gguf")
        self.assertTrue(m.details.family)
        self.assertTrue(m.details.parameter_size)
        self.assertEqual(len(m.digest), 64)
        self.assertIsNotNone(m.modified_at)

    def test_show(self):
        shown = client.show(MODEL)
        self.assertEqual(shown.details.format, "gguf")
        arch = shown.modelinfo["general.architecture"]
        self.assertGreater(shown.modelinfo[f"{arch}.context_length"], 0)
        self.assertIn("completion", shown.capabilities)
        self.assertIsInstance(shown.template, str)
        # The name without Ollama's default tag names the same model.
        untagged = MODEL.removesuffix(":latest")
        self.assertEqual(client.show(untagged).details, shown.details)

    def test_ps(self):
        running = client.ps().models
        self.assertEqual([m.model for m in running], [MODEL])
        self.assertGreater(running[0].context_length, 0)

    def test_unknown_model(self):
        with self.assertRaises(ollama.ResponseError) as caught:
            client.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(caught.exception.status_code, 404)
        self.assertIn("not found", caught.exception.error)
        with self.assertRaises(ollama.ResponseError) as caught:
            client.show("no-such-model")
        self.assertEqual(caught.exception.status_code, 404)


class Chat(unittest.TestCase):
    messages = [{"role": "user", "content": "Name three colors."}]

    def test_streamed_matches_whole(self):
        parts = list(client.chat(model=MODEL, messages=self.messages, stream=True, options=GREEDY))
        self.assertGreaterEqual(len(parts), 2)
        self.assertTrue(all(not p.done for p in parts[:-1]))
        self.assertTrue(all(p.message.role == "assistant" for p in parts))
        assert_totals(self, parts[-1])
        streamed = "".join(p.message.content or "" for p in parts)
        self.assertTrue(streamed.strip())
        whole = client.chat(model=MODEL, messages=self.messages, stream=False, options=GREEDY)
        self.assertEqual(whole.message.content, streamed)
        self.assertEqual(whole.eval_count, parts[-1].eval_count)
        assert_totals(self, whole)

    def test_num_predict_gives_length(self):
        r = client.chat(
            model=MODEL,
            messages=[{"role": "user", "content": "Write a long story about a dragon."}],
            options={"temperature": 0, "num_predict": 4},
        )
        self.assertEqual(r.done_reason, "length")
        self.assertEqual(r.eval_count, 4)

    def test_format_json(self):
        r = client.chat(
            model=MODEL,
            messages=[{"role": "user", "content": "Describe a cat as a JSON object."}],
            format="json",
            options={"temperature": 0, "num_predict": 96},
        )
        if r.done_reason == "stop":
            self.assertIsInstance(json.loads(r.message.content), dict)
        else:
            self.assertTrue(r.message.content.lstrip().startswith("{"))

    def test_format_schema_takes_only_its_properties(self):
        # As Ollama (llama.cpp's schema converter): without `additionalProperties`, the
        # properties listed are the only keys; the bounded string lets the object close.
        schema = {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"}},
            "required": ["name", "age"],
        }
        r = client.chat(
            model=MODEL,
            messages=[{"role": "user", "content": "Tell me about Ada Lovelace as JSON, with many details."}],
            format=schema,
            options={"temperature": 0, "num_predict": 96},
        )
        self.assertEqual(r.done_reason, "stop", r.message.content)
        self.assertEqual(sorted(json.loads(r.message.content)), ["age", "name"])

    def test_tools(self):
        messages = [{"role": "user", "content": "What is the weather in Paris?"}]
        for stream in (False, True):
            r = client.chat(
                model=MODEL, messages=messages, tools=[WEATHER], stream=stream,
                options={"temperature": 0, "num_predict": 64},
            )
            parts = list(r) if stream else [r]
            assert_totals(self, parts[-1])
            calls = [c for p in parts for c in (p.message.tool_calls or [])]
            text = "".join(p.message.content or "" for p in parts)
            # SmolLM2 may answer in words or call the tool; either is well formed.
            self.assertTrue(calls or text.strip())
            for call in calls:
                self.assertEqual(call.function.name, "get_weather")
                self.assertIsInstance(call.function.arguments, dict)
        # A tool result in the history goes back to the model.
        history = messages + [
            {"role": "assistant", "content": "",
             "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "18 degrees and sunny", "tool_name": "get_weather"},
        ]
        r = client.chat(model=MODEL, messages=history, tools=[WEATHER], options=GREEDY)
        assert_totals(self, r)

    def test_images_are_refused(self):
        with self.assertRaises(ollama.ResponseError) as caught:
            client.chat(
                model=MODEL,
                messages=[{"role": "user", "content": "What is this?", "images": [b"\x89PNG"]}],
            )
        self.assertEqual(caught.exception.status_code, 400)


class Generate(unittest.TestCase):
    def test_whole_and_streamed(self):
        whole = client.generate(model=MODEL, prompt="Say hello.", options=GREEDY)
        self.assertTrue(whole.response)
        assert_totals(self, whole)
        parts = list(client.generate(model=MODEL, prompt="Say hello.", options=GREEDY, stream=True))
        self.assertEqual("".join(p.response for p in parts), whole.response)
        assert_totals(self, parts[-1])

    def test_raw_and_system(self):
        raw = client.generate(
            model=MODEL, prompt="The capital of France is", raw=True,
            options={"temperature": 0, "num_predict": 4},
        )
        self.assertTrue(raw.response)
        self.assertLess(raw.prompt_eval_count, 10)
        templated = client.generate(
            model=MODEL, prompt="Say hello.", system="You are a pirate.", options=GREEDY
        )
        self.assertTrue(templated.response)

    def test_load(self):
        r = client.generate(model=MODEL)
        self.assertTrue(r.done)
        self.assertEqual(r.done_reason, "load")


class Embed(unittest.TestCase):
    def test_embed_and_embeddings(self):
        texts = ["The quick brown fox jumps over the lazy dog.", "def add(a, b): return a + b"]
        r = client.embed(model=MODEL, input=texts)
        self.assertEqual(len(r.embeddings), 2)
        first, second = r.embeddings
        self.assertEqual(len(first), len(second))
        self.assertAlmostEqual(sum(v * v for v in first), 1.0, places=4)
        self.assertNotEqual(first, second)
        self.assertGreater(r.prompt_eval_count, 0)
        # One text alone, and through the older endpoint: the same vector.
        self.assertEqual(client.embed(model=MODEL, input=texts[0]).embeddings[0], first)
        old = client.embeddings(model=MODEL, prompt=texts[0])
        self.assertEqual(list(old.embedding), first)

    def test_long_input_is_refused_without_truncate(self):
        # (Cut to the context by default: crates/api/tests/router.rs checks that.)
        long = "word " * 9000
        with self.assertRaises(ollama.ResponseError) as e:
            client.embed(model=MODEL, input=long, truncate=False)
        self.assertEqual(e.exception.status_code, 400)


class Errors(unittest.TestCase):
    def assertError(self, status, body, expected_status):
        self.assertEqual(status, expected_status, body)
        self.assertIsInstance(body, dict, body)
        self.assertEqual(set(body), {"error"}, body)
        self.assertIsInstance(body["error"], str)
        self.assertTrue(body["error"])

    def test_bad_bodies(self):
        status, body = http("POST", "/api/chat", raw=b'{"model": "x", "messages": [')
        self.assertError(status, body, 400)
        status, body = http("POST", "/api/chat", {"messages": [{"role": "user", "content": "hi"}]})
        self.assertError(status, body, 400)
        status, body = http(
            "POST", "/api/chat",
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
             "options": {"temperature": -1}},
        )
        self.assertError(status, body, 400)

    def test_unknown_model(self):
        status, body = http("POST", "/api/generate", {"model": "llama9", "prompt": "hi"})
        self.assertError(status, body, 404)
        self.assertIn("llama9", body["error"])

    def test_unsupported(self):
        status, body = http("POST", "/api/pull", {"model": "llama3"})
        self.assertError(status, body, 501)


if __name__ == "__main__":
    print(f"testing {HOST} with ollama {importlib.metadata.version('ollama')}, model {MODEL}", flush=True)
    result = unittest.main(verbosity=2, exit=False).result
    sys.exit(0 if result.wasSuccessful() and result.testsRun > 0 else 1)
