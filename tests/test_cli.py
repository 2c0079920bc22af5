"""The `idefics` command as a user runs it: a real subprocess, compared with the Python API."""

from __future__ import annotations

import re
import subprocess
import sys

import idefics
from tests.helpers import random_image


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "idefics.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_streams_the_same_text_as_the_api(reference_checkpoint, tmp_path):
    folder, _ = reference_checkpoint("small_instruct")
    image = random_image(5)
    image.save(tmp_path / "a.png")
    result = run("generate", "--model", str(folder), "User:", f"image:{tmp_path / 'a.png'}", "What is it?",
                 "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    expected = idefics.load(folder).generate(["User:", tmp_path / "a.png", "What is it?"], max_new_tokens=6)[0]
    assert result.stdout == expected + "\n"


def test_info_and_errors(reference_checkpoint, tmp_path):
    folder, _ = reference_checkpoint("small_9b")
    info = run("info", "--model", str(folder))
    assert info.returncode == 0 and "cross-attention: 2 blocks, before every 4 layer(s)" in info.stdout
    assert "<image>=501" in info.stdout
    from idefics.cpu import kernels  # every linear layer of the loaded (packed) model on one named kernel
    kernel = ("idefics AVX-512 BF16 kernel" if kernels.available() else "float32 on the AVX2 kernel"
              if kernels.widening_available() else "oneDNN (prepacked)")
    assert f"matmul kernels: {kernel} x" in info.stdout
    assert not kernels.available() or re.search(r"compiled ops on [1-9]\d* threads", info.stdout)
    quantized = run("info", "--model", str(folder), "--quantize", "int8")  # int8 weights count as weights
    assert quantized.returncode == 0, quantized.stderr
    assert parameter_lines(quantized.stdout) == parameter_lines(info.stdout)
    missing = run("generate", "--model", str(folder), f"image:{tmp_path / 'nope.png'}", "hi")
    assert missing.returncode != 0 and "image file not found" in missing.stderr
    bad_model = run("info", "--model", str(tmp_path))
    assert bad_model.returncode == 2 and "no config.json" in bad_model.stderr
    assert "image:" in run("generate", "--help").stdout


def parameter_lines(text: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index("parameters:")
    return lines[start:start + next(i for i, line in enumerate(lines[start:]) if "total" in line) + 1]


def test_info_describes_idefics2(tmp_path):
    from tests.idefics2.test_idefics2 import build_reference_idefics2

    build_reference_idefics2(tmp_path / "v2", splitting=False)
    info = run("info", "--model", str(tmp_path / "v2"))
    assert info.returncode == 0, info.stderr
    assert "idefics2" in info.stdout and "connector" in info.stdout and "sliding window" in info.stdout
