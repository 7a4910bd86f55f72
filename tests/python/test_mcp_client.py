#!/usr/bin/env python3
"""`shoal mcp` seen through the official MCP Python SDK over stdio: the five tools are
listed with their schemas and each one answers through a running Shoal node.

Usage: SHOAL_BIN=target/release/shoal SHOAL_URL=http://127.0.0.1:PORT \\
       python3 tests/python/test_mcp_client.py

Env:
  SHOAL_BIN  the shoal binary (required)
  SHOAL_URL  the running node's base URL (required)

The `mcp` package is required (`pip install mcp`).
"""

import asyncio
import json
import os
import sys
import unittest
import urllib.request

try:
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client
except ImportError:
    sys.stderr.write("FAILED: the `mcp` Python package is not installed (pip install mcp)\n")
    sys.exit(1)

BIN = os.environ.get("SHOAL_BIN", "")
URL = os.environ.get("SHOAL_URL", "")
if not BIN or not URL:
    sys.stderr.write("FAILED: set SHOAL_BIN and SHOAL_URL\n")
    sys.exit(1)


async def with_session(body, url=URL):
    params = StdioServerParameters(command=BIN, args=["mcp", "--url", url, "--timeout-s", "120"])
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            return await body(session)


QUESTION = "What is the capital of France?"


def direct_answer():
    """The node's answer to QUESTION over its HTTP API, greedy."""
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 16, "temperature": 0}
    req = urllib.request.Request(
        URL + "/v1/chat/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as res:
        return json.loads(res.read())["choices"][0]["message"]["content"]


def text(result):
    return "".join(c.text for c in result.content if getattr(c, "type", "") == "text")


class Mcp(unittest.TestCase):
    def test_the_five_tools_are_listed(self):
        async def body(s):
            return await s.list_tools()

        tools = {t.name: t for t in asyncio.run(with_session(body)).tools}
        self.assertEqual(
            set(tools), {"chat", "cluster_status", "list_models", "node_details", "hardware_info"}
        )
        schema = tools["chat"].input_schema
        self.assertIn("prompt", schema["properties"])
        self.assertIn("prompt", schema.get("required", []))
        for name, tool in tools.items():
            self.assertTrue(tool.description, name)

    def test_every_tool_answers_through_the_node(self):
        async def body(s):
            chat = await s.call_tool(
                "chat", {"prompt": QUESTION, "max_tokens": 16, "temperature": 0}
            )
            status = await s.call_tool("cluster_status", {})
            models = await s.call_tool("list_models", {})
            details = await s.call_tool("node_details", {})
            hardware = await s.call_tool("hardware_info", {})
            return chat, status, models, details, hardware

        chat, status, models, details, hardware = asyncio.run(with_session(body))
        self.assertFalse(chat.is_error, text(chat))
        self.assertEqual(text(chat), direct_answer(), "the node's own greedy answer")
        status = json.loads(text(status))
        self.assertEqual(status["health"]["status"], "ok")
        ids = json.loads(text(models))
        self.assertTrue(ids and all(isinstance(i, str) for i in ids), ids)
        self.assertIn(ids[0], [m["id"] for m in status["models"]])
        details = json.loads(text(details))
        # The chat above was served and counted.
        self.assertGreaterEqual(details["metrics"]["shoal_generated_tokens_total"], 1)
        hw = json.loads(text(hardware))
        self.assertGreaterEqual(hw["hardware"]["cpu"]["logical_cores"], 1)
        self.assertIn("model", hw["recommended"])

    def test_a_node_that_is_not_there_is_a_tool_error(self):
        async def body(s):
            return await s.call_tool("chat", {"prompt": "hi"})

        result = asyncio.run(with_session(body, url="http://127.0.0.1:9"))
        self.assertTrue(result.is_error)
        self.assertIn("cannot reach", text(result))

    def test_a_swarm_strategy_on_a_plain_node_is_a_tool_error(self):
        async def body(s):
            return await s.call_tool("chat", {"prompt": "hi", "strategy": "vote"})

        result = asyncio.run(with_session(body))
        self.assertTrue(result.is_error)
        self.assertIn("swarm", text(result).lower())


if __name__ == "__main__":
    unittest.main(verbosity=2)
