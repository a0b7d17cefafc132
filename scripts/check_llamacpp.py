"""MiniMind in llama.cpp, checked: `.pth` -> `to_llama` folder -> GGUF written by llama.cpp's own
`convert_hf_to_gguf.py` -> loaded by llama-cpp-python; tokenization, logits and greedy tokens compared with
ours, and decode tokens/s measured against ours in the same run.

    pip install llama-cpp-python                       # builds llama.cpp (CPU) from source; needs cmake + a compiler
    python scripts/check_llamacpp.py --random_model 1  # random MiniMind2-Small-sized LM (hidden 512 x 8)
    python scripts/check_llamacpp.py --save_dir out --weight sft_vlm --hidden_size 512   # your weights

The converter is the one shipped in the llama-cpp-python source distribution of the installed version:
`--llama_cpp_src DIR` names an unpacked copy (or a llama.cpp checkout); otherwise it is taken from
~/.cache/minimind-v/, where the first run unpacks it after `pip download` of that sdist.

llama.cpp's converter identifies a BPE tokenizer by hashing how it splits a test string and stops on hashes
it does not know, MiniMind's among them. MiniMind's tokenizer splits text with GPT-2's byte-level rule
(tokenizer.json: a ByteLevel pre-tokenizer with GPT-2's regex, no normaliser), which llama.cpp implements as
the "gpt-2" pre-tokenizer; this script tells the converter so (only for such a tokenizer) and then checks
that llama.cpp tokenizes the test prompts exactly as ours does.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from model import DEFAULT_TOKENIZER, PROJECT_TOKENIZER
from model.argtypes import non_negative_int, positive_int
from model.load import ModelLoadError, add_model_args, read_native
from model.weights import save_weights, weight_path

CACHE = Path(os.environ.get("MINIMIND_CACHE", Path.home() / ".cache" / "minimind-v"))
# Run inside a fresh interpreter: llama.cpp's converter, told that a GPT-2-style byte-level tokenizer it does
# not recognise uses the "gpt-2" pre-tokenizer. argv: llama.cpp dir, then the converter's own arguments.
CONVERTER_RUNNER = r"""
import runpy, sys
src = sys.argv[1]
sys.path[:0] = [src, src + "/gguf-py"]
from conversion import base
known = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [src + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
PROMPTS = [
    [{"role": "user", "content": "Hello! Who are you?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 12 + 30? Mail a@b.c"}],
    [{"role": "user", "content": "请介绍一下你自己。"}, {"role": "assistant", "content": "我是 MiniMind。"},
     {"role": "user", "content": "Tabs\tand  spaces,\n\nnew lines; 'quotes' and 123456."}],
]


class CheckError(RuntimeError):
    pass


def is_gpt2_byte_level(tokenizer_json: Path) -> bool:
    t = json.loads(tokenizer_json.read_text())
    pre = t.get("pre_tokenizer") or {}
    return (pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
            and t.get("normalizer") is None and t["model"].get("type") == "BPE")


def converter_dir(src: str | None, version: str | None, download: bool = True) -> Path | None:
    """The llama.cpp folder holding convert_hf_to_gguf.py, conversion/ and gguf-py/: `src` (or its
    vendor/llama.cpp), else the cached copy for `version`, else (download=True) fetched from the package index."""
    def ok(d: Path) -> bool:
        return (d / "convert_hf_to_gguf.py").is_file() and (d / "gguf-py").is_dir()
    if src:
        for d in (Path(src), Path(src) / "vendor" / "llama.cpp"):
            if ok(d):
                return d
        raise CheckError(f"--llama_cpp_src {src}: no convert_hf_to_gguf.py with gguf-py/ there (or in vendor/llama.cpp)")
    if version is None:
        return None
    cached = CACHE / f"llama.cpp-{version}"
    if ok(cached):
        return cached
    if not download:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={version}", "-d", tmp], capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if r.returncode or not sdists:
            raise CheckError(f"could not download the llama-cpp-python {version} sdist for its converter "
                             f"({r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'no file'}); "
                             f"pass --llama_cpp_src DIR")
        with tarfile.open(sdists[0]) as tar:
            wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
            members = []
            for m in tar.getmembers():
                rel = m.name.split("/vendor/llama.cpp/", 1)
                if len(rel) == 2 and rel[1].startswith(wanted) and (m.isfile() or m.isdir()):
                    m.name = rel[1]
                    members.append(m)
            cached.mkdir(parents=True, exist_ok=True)
            tar.extractall(cached, members=members, filter="data")
    if not ok(cached):
        raise CheckError("the sdist did not contain llama.cpp's converter; pass --llama_cpp_src DIR")
    return cached


def convert_to_gguf(llama_cpp: Path, folder: Path, out: Path, outtype: str) -> Path:
    if not is_gpt2_byte_level(folder / "tokenizer.json"):
        raise CheckError(f"{folder / 'tokenizer.json'} is not a GPT-2-style byte-level BPE tokenizer: llama.cpp's "
                         f"converter would need its pre-tokenizer registered")
    r = subprocess.run([sys.executable, "-c", CONVERTER_RUNNER, str(llama_cpp), str(folder), "--outfile", str(out),
                        "--outtype", outtype], capture_output=True, text=True)
    if r.returncode or not out.is_file():
        tail = "\n".join(r.stderr.strip().splitlines()[-5:])
        raise CheckError(f"convert_hf_to_gguf.py --outtype {outtype} failed:\n{tail}")
    return out


def random_lm(save_dir: Path, hidden: int, layers: int, seed: int = 0, use_moe: bool = False,
              name: str = "random_llm") -> Path:
    """A random MiniMind(-V) weight file whose matrices are scaled up, so that greedy choices are not near-ties
    that any rounding difference flips (a trained model has clear preferences; plain random init has almost none)."""
    from model.model_vlm import MiniMindVLM, VLMConfig
    torch.manual_seed(seed)
    model = MiniMindVLM(VLMConfig(hidden_size=hidden, num_hidden_layers=layers, use_moe=use_moe))
    with torch.no_grad():
        for p in model.model.parameters():
            if p.dim() == 2:
                p.mul_(6)
    path = weight_path(save_dir, name, hidden, use_moe)
    save_weights(model, path)
    return path


def llama_decode(llm, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens from llama.cpp and the time each arrived (prompt evaluation included in the first)."""
    tokens, times = [], []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(int(tok))
        times.append(time.perf_counter())
        if len(tokens) == n:
            break
    return tokens, times


def run(args: argparse.Namespace) -> dict:
    try:
        import llama_cpp
    except ImportError:
        raise CheckError("llama-cpp-python is not installed: `pip install llama-cpp-python` builds it (CPU) from "
                         "source") from None
    from model.generate import generate
    from model.model_vlm import MiniMindVLM
    from model.processor import load_tokenizer
    from model.weights import load_state
    from scripts.bench_decode import timed
    from scripts.convert_vlm import main as convert

    torch.set_num_threads(args.threads)
    llama_cpp_dir = converter_dir(args.llama_cpp_src, llama_cpp.__version__)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="minimind-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.random_model:
        args.hidden_size, args.num_hidden_layers = args.hidden_size or 512, args.num_hidden_layers or 8
        random_lm(work, args.hidden_size, args.num_hidden_layers)
        args.save_dir, args.weight, args.use_moe = str(work), "random_llm", 0
    src, config, state = read_native(args)  # the sizes come from the file (filled in on args)
    folder = work / "llama"
    flags = ["--save_dir", args.save_dir, "--weight", args.weight, "--hidden_size", str(args.hidden_size),
             "--num_hidden_layers", str(args.num_hidden_layers), "--use_moe", str(args.use_moe),
             "--tokenizer_path", str(args.tokenizer_path), "--out_dir", str(folder)]
    if convert(["to_llama", *flags]) != 0:
        raise CheckError("to_llama failed (see above)")

    ours = MiniMindVLM(config)
    load_state(ours, state, src)
    ours.eval()
    tok = load_tokenizer(folder)
    prompts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in PROMPTS]
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    with torch.no_grad():
        our_logits = [ours(torch.tensor([ids])).logits[0] for ids in prompt_ids]
    our_tokens = [generate(ours, torch.tensor([ids]), max_new_tokens=args.new_tokens, eos_token_id=None)[0].tolist()
                  for ids in prompt_ids]

    result = {"model": f"{src.name} (hidden {args.hidden_size} x {args.num_hidden_layers})",
              "llama_cpp_python": llama_cpp.__version__, "threads": args.threads, "checks": {}, "speed": {}}
    ggufs = {}
    for outtype in args.outtypes.split(","):
        gguf = convert_to_gguf(llama_cpp_dir, folder, work / f"model-{outtype}.gguf", outtype)
        ggufs[outtype] = gguf
        # f32 KV cache for the check (llama.cpp's default f16 cache rounds keys/values); defaults for speed.
        kv = dict(type_k=0, type_v=0) if outtype == "f32" else {}
        llm = llama_cpp.Llama(str(gguf), n_ctx=1024, n_batch=512, n_threads=args.threads, logits_all=True,
                              verbose=False, **kv)
        same_ids = [llm.tokenize(p.encode(), add_bos=False, special=True) == ids for p, ids in zip(prompts, prompt_ids)]
        diffs, same_tokens, agree = [], [], []
        for ids, want_logits, want in zip(prompt_ids, our_logits, our_tokens):
            llm.reset()
            llm.eval(ids)
            got_logits = torch.from_numpy(llm.scores[:len(ids)].copy())
            diffs.append((got_logits - want_logits).abs().max().item())
            got, _ = llama_decode(llm, ids, args.new_tokens)
            same_tokens.append(got == want)
            agree.append(next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want)))
        result["checks"][outtype] = {"gguf_mb": round(gguf.stat().st_size / 2**20, 1),
                                     "same_tokenization": all(same_ids), "max_logit_diff": max(diffs),
                                     "prompts_with_same_greedy_tokens": [sum(same_tokens), len(same_tokens)],
                                     "tokens_before_first_difference": agree}
        del llm

    if args.bench_tokens:
        ids, n = prompt_ids[0], args.bench_tokens
        llms = {t: llama_cpp.Llama(str(ggufs[t]), n_ctx=1024, n_batch=512, n_threads=args.threads, verbose=False)
                for t in args.bench_types.split(",") if t in ggufs}

        def ours_run(clock):
            return generate(ours, torch.tensor([ids]), max_new_tokens=n, eos_token_id=None, on_token=clock)
        runs: dict[str, list[float]] = {"ours (PyTorch fp32)": [], **{f"llama.cpp {t}": [] for t in llms}}
        for rep in range(args.repeats + 1):  # the first round warms up and is not counted
            r = [timed(ours_run, False)[2]]
            for t, llm in llms.items():
                _, times = llama_decode(llm, ids, n)
                r.append((len(times) - 1) / (times[-1] - times[0]))
            if rep:
                for key, v in zip(runs, r):
                    runs[key].append(v)
        result["speed"] = {"prompt_tokens": len(ids), "new_tokens": n, "repeats": args.repeats,
                           "decode_tok_s": {k: round(statistics.median(v), 1) for k, v in runs.items()},
                           "all_runs": {k: [round(x, 1) for x in v] for k, v in runs.items()}}
    result["work_dir"] = str(work)
    return result


def get_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    # The published tokenizer when downloaded (real weights need it), else the project's own.
    ap.set_defaults(tokenizer_path=str(DEFAULT_TOKENIZER if (DEFAULT_TOKENIZER / "tokenizer.json").exists()
                                       else PROJECT_TOKENIZER))
    ap.add_argument("--random_model", type=int, default=0, choices=[0, 1],
                    help="1: a random LM of --hidden_size x --num_hidden_layers (default 512 x 8) instead of a "
                         "weight file")
    ap.add_argument("--llama_cpp_src", default=None, help="unpacked llama-cpp-python sdist or llama.cpp checkout")
    ap.add_argument("--work_dir", default=None, help="where the folder and GGUF files go (default: a new temp dir)")
    ap.add_argument("--outtypes", default="f32,f16,q8_0", help="GGUF types to write and check")
    ap.add_argument("--new_tokens", type=positive_int, default=32, help="greedy tokens compared per prompt")
    ap.add_argument("--bench_tokens", type=non_negative_int, default=128, help="decode tokens timed (0: no timing)")
    ap.add_argument("--bench_types", default="f16,q8_0", help="GGUF types timed against ours")
    ap.add_argument("--repeats", type=positive_int, default=3, help="timed rounds (median reported)")
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--json", default=None, help="also write the result here")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        result = run(args)
    except (CheckError, ModelLoadError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, ensure_ascii=False))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, ensure_ascii=False))
    f32 = result["checks"].get("f32")
    ok = f32 is None or (f32["same_tokenization"] and len(set(f32["prompts_with_same_greedy_tokens"])) == 1)
    print("llama.cpp round trip: " + ("OK (f32 GGUF: same tokenization and greedy tokens as ours)" if ok else "MISMATCH"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
