"""The dashboard in a real browser: Playwright (sync API) driving Chromium against a
running cluster's head.

Environment:
  SHOAL_ROOT_URL     the head's http://HOST:PORT
  SHOAL_API_KEY      the nodes' API key
  SHOAL_KILL_NODE    the id of a ring stage to kill while an answer streams
  SHOAL_SCREENSHOTS  a folder for dashboard.png and dashboard-killed.png (optional)
  SHOAL_CHROMIUM     the browser (default /usr/bin/chromium; Playwright's own download is
                     not used)

Checks: the page loads with no console errors or page errors (collected for the whole run,
asserted at the end); with the API key entered it lists the three nodes alive, this node
marked, and the ring's three stages head first; a greedy chat answer streams (its text
grows); killing SHOAL_KILL_NODE while it streams shows that member suspect or dead within
10 s while the answer goes on and finishes with no error; then every stage of the ring
shows its compute a token and every hop its latency; healing shows it alive again.

Run by crates/shoal/tests/dashboard_e2e.rs; by hand:
  SHOAL_ROOT_URL=http://127.0.0.1:8080 SHOAL_API_KEY=KEY SHOAL_KILL_NODE=stage-b \\
      python3 tests/python/test_dashboard.py
"""

import json
import os
import sys
import tempfile
import time
import urllib.request

from playwright.sync_api import sync_playwright

ROOT = os.environ["SHOAL_ROOT_URL"].rstrip("/")
KEY = os.environ["SHOAL_API_KEY"]
KILL = os.environ["SHOAL_KILL_NODE"]
SHOTS = os.environ.get("SHOAL_SCREENSHOTS")
CHROMIUM = os.environ.get("SHOAL_CHROMIUM", "/usr/bin/chromium")
QUESTION = "Write a long story about a lighthouse keeper."
MAX_TOKENS = 150

started = time.monotonic()


def log(what):
    print(f"[dashboard {time.monotonic() - started:6.2f}s] {what}", flush=True)


def check(ok, message):
    if not ok:
        raise AssertionError(message)


def wait_until(page, predicate_js, arg, timeout_s, message):
    """Waits for a JS predicate to hold in the page; fails with `message` if it does not."""
    try:
        page.wait_for_function(predicate_js, arg=arg, timeout=timeout_s * 1000, polling=100)
    except Exception as e:  # Playwright's TimeoutError
        raise AssertionError(f"{message} (waited {timeout_s} s: {e.__class__.__name__})") from None


def shot(page, name):
    if not SHOTS:
        return
    os.makedirs(SHOTS, exist_ok=True)
    path = os.path.join(SHOTS, name)
    page.screenshot(path=path)
    log(f"screenshot {path}")


def output_len(page):
    return page.evaluate("() => (document.getElementById('chat-output')?.textContent || '').length")


def member_state(page, node):
    return page.evaluate(
        "(id) => document.querySelector(`[data-member=\"${CSS.escape(id)}\"]`)?.dataset.state ?? null", node
    )


def run(page, console_errors, page_errors):
    # The node says on its open /health whether it wants a key, so the page asks for one
    # before sending anything the node would refuse (a 401 is a console error in Chromium).
    with urllib.request.urlopen(ROOT + "/health", timeout=10) as r:
        health = json.loads(r.read() or b"{}")
    check(health.get("api_key_required") is True, f"/health does not say a key is required: {health}")
    log(f"/health: {health}")

    page.goto(ROOT + "/")
    check(page.title().startswith("Shoal"), f"the page's title is {page.title()!r}, not Shoal's")
    for hook in ["#api-key", "#chat-input", "#chat-send", "#chat-greedy", "#chat-model", "#members"]:
        check(page.locator(hook).count() == 1, f"the page has no {hook}")
    log("page loaded")

    page.wait_for_timeout(1000)
    check(
        page.locator("#conn").get_attribute("data-state") == "unauthorized",
        "without a key the page should say that it needs one",
    )

    # The key, as a user types it; it is kept in localStorage.
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    check(
        page.evaluate("() => localStorage.getItem('shoal.apiKey')") == KEY,
        "the API key was not stored in localStorage",
    )

    wait_until(
        page,
        "() => document.querySelectorAll('[data-member][data-state=\"alive\"]').length === 3",
        None,
        20,
        "the dashboard did not list 3 alive members after the API key was entered",
    )
    members = page.evaluate(
        "() => [...document.querySelectorAll('[data-member]')].map(e => [e.dataset.member, e.dataset.state, e.dataset.self])"
    )
    log(f"members: {members}")
    check(len(members) == 3, f"expected 3 members, the page lists {members}")
    check(KILL in [m[0] for m in members], f"{KILL} is not among the members {members}")
    selfs = [m[0] for m in members if m[2] == "true"]
    check(len(selfs) == 1, f"exactly one member should be marked as this node: {members}")
    check(page.locator("#conn[data-state='live']").count() == 1, "the connection indicator does not say live")

    wait_until(
        page,
        "() => document.getElementById('ring')?.dataset.stages === '3'",
        None,
        10,
        "the pipeline ring with 3 stages is not shown",
    )
    stages = page.evaluate(
        "() => [...document.querySelectorAll('#ring [data-stage]')].map(e => "
        "({id: e.dataset.stage, state: e.dataset.state, head: e.dataset.head, text: e.innerText}))"
    )
    log(f"ring: {[(s['id'], s['state']) for s in stages]}")
    check(len(stages) == 3, f"the ring shows {len(stages)} stages, not 3: {stages}")
    check(stages[0]["head"] == "true" and stages[0]["id"] == selfs[0], f"the ring does not start at the head: {stages}")
    check(all(s["state"] == "alive" for s in stages), f"not every stage is alive: {stages}")
    check(KILL in [s["id"] for s in stages], f"{KILL} is not a stage of the ring: {stages}")
    check(all("[" in s["text"] and ")" in s["text"] for s in stages), f"a stage does not show its layers: {stages}")
    check(page.locator(f'[data-kill="{KILL}"]').is_visible(), f"no kill button for {KILL} (chaos should be allowed with an API key)")

    # A chat answer, greedy, that streams.
    wait_until(
        page,
        "() => { const s = document.getElementById('chat-model'); return s && s.value !== '' && !s.value.startsWith('swarm'); }",
        None,
        10,
        "the model list (GET /v1/models) did not fill the model select",
    )
    check(page.is_checked("#chat-greedy"), "the greedy checkbox should be on by default")
    page.fill("#chat-max-tokens", str(MAX_TOKENS))
    page.fill("#chat-input", QUESTION)
    page.click("#chat-send")
    asked = time.monotonic()
    wait_until(page, "() => (document.getElementById('chat-output')?.textContent || '').length > 0", None, 60,
               "no text streamed into #chat-output")
    first = output_len(page)
    log(f"first text after {time.monotonic() - asked:.2f} s ({first} chars)")
    wait_until(page, "(n) => (document.getElementById('chat-output')?.textContent || '').length > n", first, 30,
               "the answer's text did not grow: it does not stream")
    check(
        page.locator("#chat-status").get_attribute("data-state") in ("streaming", "waiting"),
        "the chat status should say the answer is streaming",
    )
    log(f"streaming: {first} -> {output_len(page)} chars")
    shot(page, "dashboard.png")

    # Kill a stage while the answer streams.
    page.click(f'[data-kill="{KILL}"]')
    killed = time.monotonic()
    at_kill = output_len(page)
    log(f"killed {KILL} with {at_kill} chars out")
    wait_until(
        page,
        "(id) => ['suspect', 'dead'].includes(document.querySelector(`[data-member=\"${CSS.escape(id)}\"]`)?.dataset.state)",
        KILL,
        10,
        f"{KILL} did not show suspect or dead within 10 s of the kill",
    )
    log(f"{KILL} is {member_state(page, KILL)} {time.monotonic() - killed:.2f} s after the kill")
    # The moment to show: the member marked, the answer still coming where it still is.
    shot(page, "dashboard-killed.png")

    wait_until(
        page,
        "() => ['done', 'error', 'idle'].includes(document.getElementById('chat-status')?.dataset.state)",
        None,
        60,
        "the answer did not finish within 60 s of the kill",
    )
    final = output_len(page)
    status = page.locator("#chat-status").get_attribute("data-state")
    error = page.locator("#chat-error")
    error_text = error.inner_text() if error.count() else ""
    log(f"answer finished ({status}) {time.monotonic() - asked:.2f} s after asking, {final} chars; stats: "
        f"{page.locator('#chat-stats').inner_text() if page.locator('#chat-stats').count() else '-'}")
    check(error.count() == 0, f"the answer ended with an error after the kill: {error_text!r}")
    # Every stage of the ring that answered shows its compute a token (the head's from its
    # own passes, each peer's from its heartbeats), and every hop its latency.
    wait_until(
        page,
        "() => { const p = [...document.querySelectorAll('#ring .stage-pass')]; "
        "return p.length > 0 && p.every(e => Number(e.dataset.passMs) > 0); }",
        None,
        10,
        "the ring's stages did not show their compute per token",
    )
    passes = page.evaluate("() => [...document.querySelectorAll('#ring .stage-pass')].map(e => e.dataset.passMs)")
    hops = page.evaluate("() => [...document.querySelectorAll('#ring .hop')].map(e => e.textContent)")
    log(f"compute a token per stage (ms): {passes}; hops: {hops}")
    check(len(hops) == len(passes) and all(h.endswith(" ms") for h in hops),
          f"the ring's hops do not show their latency: {hops} for {len(passes)} stages")
    check(status == "done", f"the answer did not finish cleanly: status {status!r}")
    check(final > at_kill, f"the answer did not go on after the kill ({at_kill} chars then, {final} at the end)")
    text = page.locator("#chat-output").inner_text()
    check(len(text.split()) >= 40, f"the answer is too short for {MAX_TOKENS} tokens: {text!r}")

    wait_until(
        page,
        "(id) => document.querySelector(`[data-member=\"${CSS.escape(id)}\"]`)?.dataset.state === 'dead'",
        KILL,
        15,
        f"{KILL} was never shown dead after the kill",
    )
    log(f"{KILL} dead {time.monotonic() - killed:.2f} s after the kill")

    # Heal.
    page.click(f'[data-heal="{KILL}"]')
    healed = time.monotonic()
    wait_until(
        page,
        "(id) => document.querySelector(`[data-member=\"${CSS.escape(id)}\"]`)?.dataset.state === 'alive'",
        KILL,
        15,
        f"{KILL} did not show alive again within 15 s of the heal",
    )
    log(f"{KILL} alive again {time.monotonic() - healed:.2f} s after the heal")

    # Let a few more events arrive, so that errors they might cause are seen.
    page.wait_for_timeout(1500)
    check(not page_errors, f"the page threw: {page_errors}")
    check(not console_errors, f"the console showed errors: {console_errors}")


def main():
    console_errors = []
    page_errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on(
                "console",
                lambda m: console_errors.append(f"{m.text} ({m.location.get('url', '')})") if m.type == "error" else None,
            )
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            try:
                run(page, console_errors, page_errors)
            except BaseException:
                path = os.path.join(tempfile.gettempdir(), "shoal-dashboard-failure.png")
                try:
                    page.screenshot(path=path)
                    log(f"failed; the page then: {path}")
                except Exception:
                    pass
                log(f"console errors: {console_errors}; page errors: {page_errors}")
                raise
        finally:
            browser.close()
    log("dashboard: all checks passed")


if __name__ == "__main__":
    sys.exit(main())
