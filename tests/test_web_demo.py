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
    yield f"http://127.0.0.1:{port}"
    demo.close()


@pytest.fixture(scope="module")
def page(demo_url):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
            "--disable-extensions", "--no-first-run"])
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        pg.set_default_timeout(60_000)
        pg.goto(demo_url)
        pg.wait_for_selector("#send")
        yield pg
        browser.close()


def upload(page, files: list[Path]) -> None:
    page.locator("#images input[type=file]").set_input_files([str(f) for f in files])
    names = [f.stem for f in files]  # wait until gradio lists every upload (it splits name and extension)
    page.wait_for_function("names => names.every(n => document.querySelector('#images').innerText.includes(n))",
                           arg=names)


def ask(page, question: str, max_tokens: int = 24) -> None:
    box = page.locator("#max_tokens input[type=number]")
    box.fill(str(max_tokens))
    box.press("Enter")
    page.locator("#prompt textarea").fill(question)
    page.locator("#send").click()


def status_text(page, contains: str) -> str:
    page.locator("#status").get_by_text(contains, exact=False).wait_for()
    return page.locator("#status").inner_text()


def new_chat(page) -> None:
    page.locator("#clear").click()
    page.wait_for_function("() => !document.querySelector('#status').innerText.trim()")


def test_empty_prompt_and_missing_image_are_explained(page):
    new_chat(page)
    ask(page, "")
    assert "type a question" in status_text(page, "type a question")
    ask(page, "What colour is the shape?")
    assert "upload an image" in status_text(page, "upload an image")


def test_non_image_and_huge_image_are_explained(page, tmp_path):
    from PIL import Image
    new_chat(page)
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    upload(page, [bad])
    ask(page, "What is this?")
    assert "not an image" in status_text(page, "not an image")
    new_chat(page)
    huge = tmp_path / "huge.png"
    Image.new("L", (8000, 8000), 200).save(huge)  # 64 megapixels, a small file
    upload(page, [huge])
    ask(page, "What is this?")
    assert "too large" in status_text(page, "too large")


def test_upload_ask_and_answer_streams(page, tmp_path):
    new_chat(page)
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
    bot = page.locator("#chat .message.bot, #chat [data-testid='bot']").last
    assert bot.inner_text().strip(), "no answer appeared in the chat"
    assert "[2 image(s)] What colours are the shapes?" in page.locator("#chat").inner_text()
    page.screenshot(path=str(Path(os.environ.get("WEB_DEMO_SHOT", tmp_path / "web_demo.png"))), full_page=True)
    # A follow-up question in the same chat still works (the images stay in the conversation).
    ask(page, "And the first one?")
    page.wait_for_function("() => document.querySelector('#chat').innerText.includes('And the first one?')")
    status_text(page, "tokens/s")


def test_weight_menu_switches_model(page):
    page.locator("#weights input").click()
    page.get_by_role("option", name="pretrain_vlm_64.pth").click()
    assert "loaded pretrain_vlm_64.pth" in status_text(page, "loaded")
