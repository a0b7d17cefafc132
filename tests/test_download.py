"""scripts/download.py against a fake hub: only the HTTP transport is replaced, nothing leaves the machine."""
import hashlib
import re

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import constants as hub_constants

from scripts import download

SHA = "0123456789abcdef0123456789abcdef01234567"
REPOS = {
    "openai/clip-vit-base-patch16": {"config.json": b"{}", "preprocessor_config.json": b"{}",
                                     "model.safetensors": b"S" * 2048, "pytorch_model.bin": b"B" * 4096,
                                     "tokenizer.json": b"{}"},
    "jingyaogong/MiniMind2-V": {"tokenizer.json": b'{"t": 1}', "tokenizer_config.json": b"{}",
                                "model.safetensors": b"W" * 100},
    "jingyaogong/MiniMind2-V-PyTorch": {"llm_512.pth": b"L" * 10, "pretrain_vlm_512.pth": b"P" * 10,
                                        "sft_vlm_512.pth": b"F" * 10, "sft_vlm_768.pth": b"X" * 10},
    "jingyaogong/minimind-v_dataset": {"pretrain_data.parquet": b"D" * 300, "sft_data.parquet": b"E" * 200,
                                       "pretrain_images.zip": b"Z" * 50},
    "Lin-Chen/MMStar": {"mmstar.parquet": b"M" * 30, "MMStar.tsv": b"T" * 40, "README.md": b"#"},
    "lmms-lab/POPE": {"data/test-00000-of-00002.parquet": b"P" * 20, "data/test-00001-of-00002.parquet": b"Q" * 20,
                      "Full/adversarial-00000-of-00001.parquet": b"F" * 20, "README.md": b"#"},
}


class FakeHub:
    """Answers the three kinds of request snapshot_download makes: revision info, file tree, file."""

    def __init__(self, reachable: bool = True):
        self.reachable = reachable
        self.requests: list[str] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        url = str(request.url)
        self.requests.append(f"{request.method} {url}")
        if not self.reachable:
            raise httpx2.ConnectError("name resolution failed", request=request)
        if m := re.match(r"https://[^/]+/api/(?:models|datasets)/([^/]+/[^/]+)/revision/", url):
            files = REPOS.get(m[1])
            return (httpx2.Response(200, json={"id": m[1], "sha": SHA, "siblings": [{"rfilename": f} for f in files]})
                    if files else httpx2.Response(404, json={"error": "Repository not found"}))
        if m := re.match(r"https://[^/]+/api/(?:models|datasets)/([^/]+/[^/]+)/tree/", url):
            return httpx2.Response(200, json=[{"type": "file", "path": f, "size": len(b),
                                               "oid": hashlib.sha1(b).hexdigest()} for f, b in REPOS[m[1]].items()])
        if m := re.match(r"https://[^/]+/(?:datasets/)?([^/]+/[^/]+)/resolve/[^/]+/(.+)", url):
            body = REPOS.get(m[1], {}).get(m[2])
            if body is not None:
                headers = {"X-Repo-Commit": SHA, "ETag": f'"{hashlib.sha1(body).hexdigest()}"',
                           "Content-Length": str(len(body))}
                return httpx2.Response(200, headers=headers, content=b"" if request.method == "HEAD" else body)
        return httpx2.Response(404, json={"error": "not found"})


@pytest.fixture
def hub(monkeypatch, tmp_path):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    for name in ("DEFAULT_CLIP", "DEFAULT_TOKENIZER", "OUT_DIR", "DATA_DIR", "BENCH_DIR"):
        monkeypatch.setattr(download, name, tmp_path / name.lower())
    from huggingface_hub.utils import _http
    original = _http._GLOBAL_CLIENT_FACTORY
    fake = FakeHub()
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(fake)))
    yield fake
    huggingface_hub.set_client_factory(original)


def test_downloads_everything_into_the_default_paths(hub, tmp_path, capsys):
    assert download.main([]) == 0
    assert (tmp_path / "default_clip" / "model.safetensors").read_bytes() == b"S" * 2048
    assert not (tmp_path / "default_clip" / "pytorch_model.bin").exists()  # only what is needed
    assert not (tmp_path / "default_clip" / "tokenizer.json").exists()
    assert (tmp_path / "default_tokenizer" / "tokenizer.json").read_bytes() == b'{"t": 1}'
    out = sorted(p.name for p in (tmp_path / "out_dir").glob("*.pth"))
    assert out == ["llm_512.pth", "pretrain_vlm_512.pth", "sft_vlm_512.pth"]
    data = sorted(p.name for p in (tmp_path / "data_dir").glob("*") if p.is_file())
    assert data == ["pretrain_data.parquet", "sft_data.parquet"]
    assert any("/datasets/jingyaogong/minimind-v_dataset/resolve/" in r for r in hub.requests)


def test_rerun_skips_complete_files(hub):
    assert download.main(["weights"]) == 0
    hub.requests.clear()
    assert download.main(["weights"]) == 0
    assert not any(r.startswith("GET") and "/resolve/" in r for r in hub.requests)


def test_mirror_endpoint_is_used(hub):
    assert download.main(["tokenizer", "--endpoint", "https://hf-mirror.example"]) == 0
    assert hub.requests and all("hf-mirror.example" in r for r in hub.requests if "/api/agent" not in r)


def test_unreachable_hub_gives_a_clear_message(hub, capsys):
    hub.reachable = False
    assert download.main(["clip"]) == 2
    err = capsys.readouterr().err
    assert "could not download openai/clip-vit-base-patch16" in err
    assert "--endpoint" in err and "quickstart" in err


def test_missing_expected_file_is_reported(hub, capsys):
    assert download.main(["weights", "--hidden_size", "768"]) == 2
    assert "did not provide ['llm_768.pth']" in capsys.readouterr().err


def test_benchmark_files_only_the_scored_split(hub, tmp_path, capsys):
    assert download.main(["bench", "mmstar", "pope"]) == 0
    bench = tmp_path / "bench_dir"
    got = sorted(str(p.relative_to(bench)) for p in bench.rglob("*") if p.is_file() and ".cache" not in p.parts)
    assert got == ["mmstar/mmstar.parquet", "pope/data/test-00000-of-00002.parquet",
                   "pope/data/test-00001-of-00002.parquet"]
    assert any("/datasets/lmms-lab/POPE/resolve/" in r for r in hub.requests)
    assert not (tmp_path / "default_clip").exists()  # only what was named
    with pytest.raises(SystemExit):
        download.main(["bench"])
    assert "bench needs benchmark names from ['mmstar'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        download.main(["bench", "imagenet"])
