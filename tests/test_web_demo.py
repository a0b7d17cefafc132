"""The gradio demo end to end in headless Chromium (Debian's /usr/bin/chromium driven by playwright)."""
import os
import shutil
from pathlib import Path

import pytest

from tests.infer_helpers import free_port, model_flags, png_bytes, tiny_weights

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not (Path(CHROMIUM).exists() or shutil.which("chromium")),
                                reason="chromium is not installed")


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory, tiny_clip):
    import web_demo
    save_dir = tmp_path_factory.mktemp("weights")
    tiny_weights(save_dir)
    tiny_weights(save_dir, name="pretrain_vlm", seed=1)
    port = free_port()
    args = web_demo.get_parser().parse_args(model_flags(save_dir, tiny_clip) + ["--port", str(port)])
    demo = web_demo.launch(args, block=False)
    yield f"http://127.0.0.1:{port}", demo.holder
    demo.close()


@pytest.fixture(scope="module")
def demo_holder(demo_url):
    return demo_url[1]


@pytest.fixture(scope="module")
def page(demo_url):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
            "--disable-extensions", "--no-first-run"])
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        pg.set_default_timeout(60_000)
        pg.goto(demo_url[0])
        pg.wait_for_selector("#prompt textarea")
        yield pg
        browser.close()


def upload(page, files: list[Path]) -> None:
    page.locator("#prompt input[type=file]").set_input_files([str(f) for f in files])
    page.wait_for_function("n => document.querySelectorAll('#prompt img').length >= n", arg=len(files))


def ask(page, question: str, max_tokens: int = 24) -> None:
    box = page.locator("#max_tokens input[type=number]")
    box.fill(str(max_tokens))
    box.press("Enter")
    page.locator("#prompt textarea").fill(question)
    page.locator("#prompt [data-testid=submit-button]").click()


def status_text(page, contains: str) -> str:
    page.locator("#status").get_by_text(contains, exact=False).wait_for()
    return page.locator("#status").inner_text()


def new_chat(page) -> None:
    page.locator("#clear").click()
    page.wait_for_function("() => !document.querySelector('#status').innerText.trim()")


def bot_text(page) -> str:
    bots = page.locator("#chat .message.bot, #chat [data-testid='bot']")
    return bots.last.inner_text() if bots.count() else ""


def test_empty_prompt_and_missing_image_are_explained(page):
    new_chat(page)
    ask(page, "")
    assert "type a question" in status_text(page, "type a question")
    ask(page, "What colour is the shape?")
    assert "attach an image" in status_text(page, "attach an image")


def test_non_image_and_huge_image_are_explained_without_paths(page, tmp_path):
    from PIL import Image
    new_chat(page)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    page.locator("#prompt input[type=file]").set_input_files([str(bad)])
    page.wait_for_timeout(500)
    ask(page, "What is this?")
    text = status_text(page, "not an image")
    assert "notes.png" in text and str(tmp_path) not in text and "/tmp" not in text
    new_chat(page)
    huge = tmp_path / "huge.png"
    Image.new("L", (8000, 8000), 200).save(huge)  # 64 megapixels, a small file
    page.locator("#prompt textarea").fill("")
    upload(page, [huge])
    ask(page, "What is this?")
    assert "too large" in status_text(page, "too large")


def test_upload_ask_and_answer_streams(page, tmp_path):
    new_chat(page)
    page.evaluate("() => { for (const b of document.querySelectorAll('#prompt button[aria-label*=emove]')) b.click(); }")
    a, b = tmp_path / "red.png", tmp_path / "blue.png"
    a.write_bytes(png_bytes((220, 30, 30)))
    b.write_bytes(png_bytes((30, 60, 220)))
    upload(page, [a, b])
    # Record every text the answer bubble shows: a streamed answer passes through several.
    page.evaluate("""() => { window.__seen = new Set();
        new MutationObserver(() => { const bots = document.querySelectorAll('#chat .message.bot, #chat [data-testid="bot"]');
            if (bots.length) window.__seen.add(bots[bots.length - 1].innerText); })
        .observe(document.querySelector('#chat'), {subtree: true, childList: true, characterData: true}); }""")
    ask(page, "What colours are the shapes?", max_tokens=64)
    status_text(page, "tokens/s")  # the stream finished
    assert page.evaluate("() => window.__seen.size") >= 3, "the answer did not stream (appeared at once)"
    assert bot_text(page).strip(), "no answer appeared in the chat"
    assert "What colours are the shapes?" in page.locator("#chat").inner_text()
    assert page.locator("#chat img").count() >= 2, "no image thumbnails in the chat"
    assert page.locator("#prompt img").count() == 0 and page.locator("#prompt textarea").input_value() == "", \
        "the sent question and its images are still in the box"
    page.screenshot(path=str(Path(os.environ.get("WEB_DEMO_SHOT", tmp_path / "web_demo.png"))), full_page=True)
    # A follow-up question in the same chat still works (the images stay in the conversation).
    ask(page, "And the first one?")
    page.wait_for_function("() => document.querySelector('#chat').innerText.includes('And the first one?')")
    status_text(page, "tokens/s")


def test_stop_cancels_the_answer(page, demo_holder, tmp_path):
    import time

    import torch
    engine = demo_holder.engine
    # A long answer: every forward sleeps a little and EOS is never chosen.
    hook = engine.model.model.register_forward_pre_hook(lambda *a: time.sleep(0.03))
    no_eos = engine.model.lm_head.register_forward_hook(lambda m, i, out: out.index_fill(-1, torch.tensor([2]), -1e9))
    try:
        new_chat(page)
        img = tmp_path / "green.png"
        img.write_bytes(png_bytes((30, 200, 30)))
        upload(page, [img])
        ask(page, "Tell me everything.", max_tokens=1500)
        page.wait_for_function("() => { const b = document.querySelectorAll('#chat .message.bot, #chat [data-testid=\"bot\"]');"
                               " return b.length && b[b.length - 1].innerText.trim().length > 0; }")
        page.locator("#stop").click()
        assert "stopped" in status_text(page, "stopped")
        deadline = time.time() + 5
        while engine.running and time.time() < deadline:
            time.sleep(0.05)
        assert engine.running == 0, "the row kept generating after Stop"
        shown = bot_text(page)
        page.wait_for_timeout(600)
        assert bot_text(page) == shown  # nothing more streams in
    finally:
        hook.remove()
        no_eos.remove()
    ask(page, "And now?")  # the chat goes on after a stop
    status_text(page, "tokens/s")


def test_weight_menu_switches_model(page):
    page.locator("#weights input").click()
    page.get_by_role("option", name="pretrain_vlm_64.pth").click()
    assert "loaded pretrain_vlm_64.pth" in status_text(page, "loaded")
