"""CUDA-graph batch buckets (``siglip.model.graphs``): the plan that maps a batch onto captured sizes, and the encoder's
fallback to eager where graphs cannot run. Capture and replay themselves need a GPU: the service checks every
capture against the eager forward at start-up (``graph_or_none``) and runs eager when they differ."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import encode, make_image
from hypothesis import given
from hypothesis import strategies as st

from siglip.model.graphs import bucket_sizes, graph_or_none, plan_batches, run_in_buckets
from siglip.settings import Settings


def test_bucket_sizes():
    assert bucket_sizes(64) == (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64)
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(5) == (1, 2, 4, 5)
    assert bucket_sizes(100) == (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 100)
    with pytest.raises(ValueError):
        bucket_sizes(0)


def test_plan_examples():
    b = bucket_sizes(64)
    assert plan_batches(0, b) == []
    assert plan_batches(1, b) == [1]
    assert plan_batches(3, b) == [4]  # one padded row
    assert plan_batches(5, b) == [6]
    assert plan_batches(17, b) == [16, 1]  # 24 would pad 7 rows: run 16 + 1 instead
    assert plan_batches(33, b) == [32, 1]
    assert plan_batches(40, b) == [48]
    assert plan_batches(64, b) == [64]
    assert plan_batches(130, b) == [64, 64, 2]


@given(n=st.integers(0, 400), max_batch=st.integers(1, 128))
def test_plan_covers_the_batch_and_pads_little(n, max_batch):
    buckets = bucket_sizes(max_batch)
    plan = plan_batches(n, buckets)
    assert all(b in buckets for b in plan)
    assert sum(plan) >= n
    if plan:
        assert sum(plan[:-1]) < n  # every bucket but the last holds only real rows
        assert sum(plan) - n <= max(1, plan[-1] // 4)


@pytest.mark.parametrize("n", [1, 3, 5, 17, 33, 40, 64, 65, 130, 200])
def test_run_in_buckets_gives_each_row_its_own_output_in_order(n):
    """Chunks are padded to their bucket the way replays are (rows past the chunk hold stale data, NaN here):
    the joined output must be the row-wise function of the input, with nothing from the padding."""
    import torch

    buckets = bucket_sizes(64)
    x = torch.randn(n, 5, generator=torch.Generator().manual_seed(n))
    calls = []

    def run(bucket, chunk):
        assert chunk.shape[0] <= bucket
        padded = torch.full((bucket, 5), float("nan"))
        padded[:chunk.shape[0]] = chunk
        calls.append(bucket)
        return (padded * 2 + padded.sum(dim=1, keepdim=True))[:chunk.shape[0]]

    got = run_in_buckets(x, buckets, run, torch.cat)
    assert calls == plan_batches(n, buckets)
    torch.testing.assert_close(got, x * 2 + x.sum(dim=1, keepdim=True))


def test_capture_failure_falls_back_to_eager(caplog):
    """Here capture fails for real (no CUDA): the caller gets None, i.e. eager, and the reason is logged."""
    import torch

    with caplog.at_level(logging.WARNING, logger="siglip.graphs"):
        graphed = graph_or_none(torch, lambda x: x * 2, lambda b: torch.zeros(b, 4), bucket_sizes(8), "cpu")
    assert graphed is None
    assert "CUDA graph capture failed" in caplog.text and "runs eager" in caplog.text


def test_cuda_graphs_setting():
    assert Settings.from_env({}).cuda_graphs is False
    assert Settings.from_env({"SIGLIP_CUDA_GRAPHS": "1"}).cuda_graphs is True
    # with SIGLIP_COMPILE the compiled kernels are what gets captured
    both = Settings.from_env({"SIGLIP_COMPILE": "1", "SIGLIP_CUDA_GRAPHS": "1"})
    assert both.compile and both.cuda_graphs


def test_graphs_requested_on_cpu_run_eager_with_a_warning(tiny_checkpoint, reference, caplog):
    from siglip.api.images import ImageSpec, load_pixels
    from siglip.model.encoder import SiglipEncoder

    enc = SiglipEncoder(Settings(model=str(tiny_checkpoint), device="cpu", dtype="float32", backend="torch",
                                 cuda_graphs=True))
    with caplog.at_level(logging.WARNING, logger="siglip"):
        enc.load()
    assert enc.error is None and enc.info.cuda_graphs is None
    assert "SIGLIP_CUDA_GRAPHS=1 needs a CUDA device" in caplog.text
    spec = ImageSpec(enc.info.image_height, enc.info.image_width, resample=enc.info.resample)
    images = [make_image(i) for i in range(3)]
    got = enc.encode_images(np.stack([load_pixels(encode(im), "x", spec, 10**9) for im in images]))
    cos = (got * reference.image_embeds(images)).sum(axis=1)
    assert cos.min() > 0.9999, cos
