"""The speed benchmark's own machinery (benchmarks/): random checkpoints that both implementations load
completely, Idefics2 inputs, and a tiny end-to-end table in which both sides generate the same greedy tokens.
No timing is asserted."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark scripts are not a package
import bench_speed  # noqa: E402
import common  # noqa: E402

from idefics.checkpoint import load_model  # noqa: E402

TINY_IDEFICS2 = dict(
    model_type="idefics2", image_token_id=common.IMAGE, tie_word_embeddings=False,
    text_config=dict(vocab_size=32003, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
                     pad_token_id=0, sliding_window=4096),
    vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       image_size=56, patch_size=7),
    perceiver_config=dict(resampler_n_latents=4, resampler_depth=1, resampler_n_heads=4, resampler_head_dim=8,
                          num_key_value_heads=2),
)


@pytest.fixture
def tiny_idefics2(tmp_path, monkeypatch):
    folder = common.write_random_checkpoint(tmp_path / "idefics2", TINY_IDEFICS2, torch.float32)
    # the benchmark's Idefics2 inputs use the preset's latents and image size: scale them down with the model
    monkeypatch.setitem(common.BENCH_IDEFICS2, "perceiver_config", TINY_IDEFICS2["perceiver_config"])
    monkeypatch.setattr(common, "IDEFICS2_IMAGE_SIZE", 56)
    return folder


def test_idefics2_inputs_have_one_image_token_per_latent():
    inputs = common.prompt_inputs(2, 10, 3, 56, image_seq_len=4)
    ids = inputs["input_ids"]
    assert ids.shape == (2, 1 + 3 * 5 + 1 + 10)
    assert int((ids[0] == common.IMAGE).sum()) == 12 and int((ids[0] == common.FAKE).sum()) == 4
    assert inputs["pixel_values"].shape == (2, 3, 3, 56, 56)
    assert inputs["pixel_attention_mask"].shape == (2, 3, 56, 56)


def test_random_idefics2_checkpoint_loads_completely_on_both_sides(tiny_idefics2):
    from transformers import Idefics2ForConditionalGeneration

    ours = load_model(tiny_idefics2)  # strict: raises on a missing or unexpected tensor
    ref, info = Idefics2ForConditionalGeneration.from_pretrained(tiny_idefics2, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    inputs = bench_speed.Family("idefics2").inputs(1, 6, 1)
    with torch.no_grad():
        expected = ref.eval()(**inputs).logits
        got = ours(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_decode_bytes_of_idefics2_counts_decoder_head_and_cache(tiny_idefics2):
    model = load_model(tiny_idefics2)
    t = model.config.text_config
    decoder = sum(p.numel() for p in model.model.text_model.layers.parameters()) + t.hidden_size
    head = model.lm_head.weight.numel()
    kv = 2 * t.num_hidden_layers * 3 * t.num_key_value_heads * 20 * model.config.head_dim
    assert bench_speed.decode_bytes(model, 3, 20) == 4 * (decoder + head + kv)


def test_prefill_flops_of_a_text_prompt_are_two_per_weight_and_token(tiny_idefics2):
    family = bench_speed.Family("idefics2")
    model = load_model(tiny_idefics2)
    tokens = family.inputs(1, 12, 0)["input_ids"].shape[1]
    linear = sum(m.weight.numel() for m in model.model.text_model.layers.modules() if isinstance(m, torch.nn.Linear))
    expected = 2 * tokens * linear + 2 * model.lm_head.weight.numel()  # logits of the last position only
    assert bench_speed.prefill_flops(tiny_idefics2, family, [(0, 12)]) == {(0, 12): expected}


def test_matmul_peak_is_a_rate():
    rate = common.matmul_peak(torch.float32, size=128, repeats=1)
    assert 1e8 < rate < 1e14  # FLOP/s: above 0.1 GFLOP/s, below 100 TFLOP/s for one CPU process


def test_tiny_idefics2_table_has_equal_greedy_tokens(tiny_idefics2, monkeypatch):
    monkeypatch.setattr(common, "memory_bandwidth", lambda *a, **k: 20e9)  # the real one reads 1 GiB 7 times
    monkeypatch.setattr(common, "matmul_peak", lambda *a, **k: 1e11)  # the real one multiplies 2048^2 matrices
    args = argparse.Namespace(quick=True, repeats=1, new_tokens=4, quantize=["int8"])
    table, bandwidth = bench_speed.Table(), [20e9]
    bench_speed.bench_dtype("float32", tiny_idefics2, args, table, bandwidth)
    rows = {row[1]: row for row in table.rows}
    assert set(rows) == {"prefill 1 img, 128 text tok", "prefill 4 img, 128 text tok", "decode batch 1",
                         "decode batch 8"}
    for batch in (1, 8):
        assert "greedy tokens equal" in rows[f"decode batch {batch}"][-1]
    assert "of compute bound" in rows["prefill 1 img, 128 text tok"][-1]


def test_family_context_counts_every_prompt_position():
    family = bench_speed.Family("idefics2")
    for images in (1, 3):
        assert family.context(10, images) == family.inputs(1, 10, images)["input_ids"].shape[1]
    assert bench_speed.Family("idefics").context(128) == common.prompt_inputs(1, 128, 1, 224)["input_ids"].shape[1]


def test_kernel_benchmark_prints_a_row_per_kind_and_size(monkeypatch, capsys):
    from idefics.cpu import kernels

    if not kernels.available() and not kernels.widening_available():
        pytest.skip("no CPU kernel is used on this machine")
    import bench_kernels

    monkeypatch.setattr(bench_kernels, "SHAPES", {"463M": [(130, 96, "tiny")]})
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--memory", "1", "--repeats", "1"])
    threads = torch.get_num_threads()
    try:
        bench_kernels.main()
    finally:
        torch.set_num_threads(threads)  # main() pins 1 thread
    rows = [line for line in capsys.readouterr().out.splitlines() if "| tiny 130 x 96 |" in line]
    kinds = [(row.split("|")[1].strip(), row.split("|")[3].strip()) for row in rows]
    assert kinds == [(k, r) for r in ("1", "8", "128") for k in ("bfloat16", "float32", "int8")]
    assert all(row.rstrip().endswith("x |") and "streaming" in row for row in rows[:3])
