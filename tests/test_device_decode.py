"""The forwarded-JPEG path: the gateway checks a JPEG's header and sends its bytes; the model service decodes
(nvJPEG on a GPU, PIL here with SIGLIP_DEVICE_DECODE=on), applies EXIF orientation and resizes on its device."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import b64, encode, make_image
from PIL import Image


@pytest.fixture(scope="module")
def forwarding(start_service):
    return start_service(SIGLIP_DTYPE="float32", SIGLIP_DEVICE_DECODE="on")


def test_model_reports_its_jpeg_decoder(forwarding):
    assert "JPEG decode in pil" in forwarding.log()


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
