"""The forwarded-JPEG path: the gateway checks a JPEG's header and sends its bytes; the model service decodes
(nvJPEG on a GPU, PIL here with SIGLIP_DEVICE_DECODE=on), applies EXIF orientation and resizes on its device."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import b64, encode, make_image
from PIL import Image


@pytest.fixture(scope="module")
def forwarding(in_process):
    return in_process(SIGLIP_DTYPE="float32", SIGLIP_DEVICE_DECODE="on")


def test_model_reports_its_jpeg_decoder(forwarding):
    assert forwarding.client.get("/info").json()["jpeg_decode"] == "pil"


def test_mixed_batch_keeps_order_and_matches_reference(forwarding, reference):
    images = [make_image(i, size=(160, 120)) for i in range(4)]
    blobs = [encode(images[0], "JPEG", quality=95), encode(images[1], "PNG"), encode(images[2], "JPEG", quality=95),
             encode(images[3].convert("CMYK"), "JPEG", quality=95)]  # CMYK is decoded by the gateway
    r = forwarding.post("/image_embedding", {"inputs": [b64(b) for b in blobs]})
    assert r.status_code == 200, r.text
    got = np.array([row["embedding"] for row in r.json()])
    want = reference.image_embeds([Image.open(io.BytesIO(b)) for b in blobs])
    cos = (got * want).sum(axis=1)
    assert cos.min() > 0.9999, cos
    # and each row is its own image, not a neighbour's
    assert np.argmax(got @ want.T, axis=1).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(forwarding, reference, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    blob = encode(make_image(7, size=(160, 100)), "JPEG", exif=exif, quality=95)
    r = forwarding.post("/image_embedding", {"inputs": b64(blob)})
    got = np.array(r.json()[0]["embedding"])
    want = reference.image_embeds([Image.open(io.BytesIO(blob))])[0]  # reference applies exif_transpose
    assert float(got @ want) > 0.9999


def test_undecodable_jpeg_fails_only_its_request(forwarding):
    good = encode(make_image(1), "JPEG")
    broken = good[:200] + bytes(len(good) - 200)  # valid header, garbage scan data
    r = forwarding.post("/image_embedding", {"inputs": [b64(good), b64(broken)]})
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert "inputs[1]" in r.json()["error"]
    assert forwarding.post("/image_embedding", {"inputs": b64(good)}).status_code == 200


@pytest.mark.parametrize("chunk_bytes", [None, 12 * 160 * 120])  # default, and one image per resize call
def test_one_call_with_mixed_sizes_orientations_and_a_bad_file(tiny_checkpoint, reference, monkeypatch,
                                                               chunk_bytes):
    """Images of the same decoded size are resized together: every row must still be its own image, in order."""
    from siglip.model import encoder as encoder_module
    from siglip.model.encoder import SiglipEncoder
    from siglip.settings import Settings

    if chunk_bytes:
        monkeypatch.setattr(encoder_module, "RESIZE_CHUNK_BYTES", chunk_bytes)

    enc = SiglipEncoder(Settings(model=str(tiny_checkpoint), device="cpu", dtype="float32", backend="torch",
                                 device_decode="on"))
    enc.load()
    assert enc.error is None and enc.info.jpeg_decode == "pil"
    exif = Image.Exif()
    exif[0x0112] = 6
    blobs = [encode(make_image(30, size=(160, 120)), "JPEG", quality=95),
             encode(make_image(31, size=(120, 160)), "JPEG", quality=95),  # same decoded size as [2] after its rotation
             encode(make_image(32, size=(160, 120)), "JPEG", quality=95, exif=exif),
             b"\xff\xd8\xff" + bytes(300),  # undecodable
             encode(make_image(33, size=(160, 120)), "JPEG", quality=95),
             encode(make_image(34, size=(90, 200)), "JPEG", quality=95)]
    orientations = [1, 1, 6, 1, 1, 1]
    got = enc.encode_jpegs(list(zip(blobs, orientations)))
    assert np.isnan(got[3]).all() and not np.isnan(np.delete(got, 3, axis=0)).any()
    good = [0, 1, 2, 4, 5]
    want = reference.image_embeds([Image.open(io.BytesIO(blobs[i])) for i in good])
    cos = (got[good] * want).sum(axis=1)
    assert cos.min() > 0.9999, cos
    assert np.argmax(got[good] @ want.T, axis=1).tolist() == list(range(len(good)))
    alone = enc.encode_jpegs([(blobs[2], 6)])[0]
    np.testing.assert_allclose(alone, got[2], atol=1e-5)
