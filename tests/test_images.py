"""``siglip.api.images``: base64/data-URI decoding, header checks before decoding, supported formats."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib

import numpy as np
import pytest
from conftest import b64, encode, make_image
from PIL import Image

from siglip.api.errors import BadRequest
from siglip.api.images import (
    ImageSpec,
    decode_image_string,
    is_http_url,
    load_pixels,
    open_checked,
    prepare_image_string,
)

SPEC = ImageSpec(32, 32)
BIG = 10**9
PNG = encode(make_image(1), "PNG")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature + a valid IHDR (correct CRC) claiming width x height, then IEND: no pixel data at all."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def bad(fn, *args, **kwargs) -> str:
    with pytest.raises(BadRequest) as info:
        fn(*args, **kwargs)
    assert info.value.status == 400
    return info.value.message


# ---------------------------------------------------------------------------------------------------------------
# decode_image_string
# ---------------------------------------------------------------------------------------------------------------
def test_raw_base64():
    assert decode_image_string(b64(PNG), "inputs", max_bytes=BIG) == PNG


@pytest.mark.parametrize("mime", ["image/png", "image/jpeg", "IMAGE/PNG", ""])
def test_data_uri(mime):
    assert decode_image_string(f"data:{mime};base64,{b64(PNG)}", "inputs", BIG) == PNG
    assert decode_image_string(f"DATA:{mime};BASE64,{b64(PNG)}", "inputs", BIG) == PNG


def test_data_uri_without_base64_marker_is_refused():
    msg = bad(decode_image_string, "data:image/png," + b64(PNG), "inputs[3]", BIG)
    assert msg.startswith("inputs[3]:") and "data URI" in msg
    assert "data URI" in bad(decode_image_string, "data:image/png;base64" + b64(PNG), "inputs", BIG)


def test_line_wrapped_base64():
    wrapped = base64.encodebytes(PNG).decode()  # MIME: 76-char lines with \n
    assert "\n" in wrapped.strip()
    assert decode_image_string(wrapped, "inputs", BIG) == PNG
    crlf = "\r\n".join(b64(PNG)[i:i + 64] for i in range(0, len(b64(PNG)), 64))
    assert decode_image_string(crlf, "inputs", BIG) == PNG


def test_url_safe_base64():
    data = PNG + b"\xfb\xff\xfe" * 40  # make sure - and _ really occur
    urlsafe = base64.urlsafe_b64encode(data).decode()
    assert "-" in urlsafe or "_" in urlsafe
    assert decode_image_string(urlsafe, "inputs", BIG) == data


def test_missing_padding():
    data = PNG[:-1] if len(PNG) % 3 == 0 else PNG
    encoded = b64(data)
    assert encoded.endswith("=")
    assert decode_image_string(encoded.rstrip("="), "inputs", BIG) == data


@pytest.mark.parametrize("value", ["not base64 at all!", "abcde", "%%%%", "data:image/png;base64,@@@@", "ab=cd==="])
def test_invalid_base64_names_where(value):
    msg = bad(decode_image_string, value, "inputs[7]", BIG)
    assert msg.startswith("inputs[7]:")


def test_empty_payload():
    assert "empty" in bad(decode_image_string, "data:image/png;base64,", "inputs", BIG)


def test_oversize_refused_before_decoding():
    # invalid base64 far over the cap: refused for its size, so it was never decoded
    msg = bad(decode_image_string, "!" * 4000, "inputs.image", max_bytes=1000)
    assert msg.startswith("inputs.image:") and "SIGLIP_MAX_IMAGE_BYTES" in msg
    valid = b64(PNG)
    assert "SIGLIP_MAX_IMAGE_BYTES" in bad(decode_image_string, valid, "inputs", max_bytes=len(PNG) - 10)
    assert decode_image_string(valid, "inputs", max_bytes=len(PNG)) == PNG
    uri = "data:image/png;base64," + valid
    assert "SIGLIP_MAX_IMAGE_BYTES" in bad(decode_image_string, uri, "inputs", max_bytes=len(PNG) - 10)


def test_is_http_url():
    assert is_http_url("http://a") and is_http_url("HTTPS://a") and is_http_url("hTTp://a")
    assert not is_http_url("ftp://a") and not is_http_url("httpx://a") and not is_http_url(" http://a")


# ---------------------------------------------------------------------------------------------------------------
# open_checked: header-only checks
# ---------------------------------------------------------------------------------------------------------------
def test_huge_header_refused_quickly():
    data = png_header_only(20000, 20000)
    assert len(data) < 100
    t0 = time.perf_counter()
    msg = bad(open_checked, data, "inputs[1]", 40_000_000)
    assert time.perf_counter() - t0 < 1.0
    assert msg.startswith("inputs[1]:") and "SIGLIP_MAX_IMAGE_PIXELS" in msg
    t0 = time.perf_counter()
    assert "SIGLIP_MAX_IMAGE_PIXELS" in bad(load_pixels, data, "inputs", SPEC, 40_000_000)
    assert time.perf_counter() - t0 < 1.0


def test_header_over_cap_below_pil_limit():
    msg = bad(open_checked, png_header_only(8000, 8000), "inputs", 40_000_000)
    assert "8000x8000" in msg and "SIGLIP_MAX_IMAGE_PIXELS" in msg


def test_cap_above_pil_warning_threshold_is_honoured():
    # 100 MP is over PIL's own warning threshold (~89 MP) but under a configured 200 MP cap: allowed
    assert open_checked(png_header_only(10000, 10000), "inputs", 200_000_000).size == (10000, 10000)
    assert "100.0 megapixels" in bad(open_checked, png_header_only(10000, 10000), "inputs", 90_000_000)


def test_just_over_small_cap():
    exact = encode(make_image(2, size=(10, 10)).resize((10, 10)), "PNG")
    over = encode(make_image(2, size=(11, 10)).resize((11, 10)), "PNG")
    assert open_checked(exact, "inputs", max_pixels=100).size == (10, 10)
    msg = bad(open_checked, over, "inputs[0]", max_pixels=100)
    assert msg.startswith("inputs[0]:") and "11x10" in msg
    assert "SIGLIP_MAX_IMAGE_PIXELS" in bad(load_pixels, over, "inputs", SPEC, 100)


def test_truncated_jpeg():
    jpeg = encode(make_image(3, size=(200, 150)), "JPEG", quality=90)
    truncated = jpeg[: len(jpeg) // 2]
    open_checked(truncated, "inputs", BIG)  # the header alone is fine ...
    msg = bad(load_pixels, truncated, "inputs[4]", SPEC, BIG)  # ... decoding is not
    assert msg.startswith("inputs[4]:") and "could not be decoded" in msg


def test_truncated_png():
    png = encode(make_image(3, size=(200, 150)), "PNG")
    assert bad(load_pixels, png[: len(png) // 2], "inputs", SPEC, BIG).startswith("inputs:")
    assert bad(load_pixels, png[:20], "inputs", SPEC, BIG).startswith("inputs:")


def test_random_bytes():
    data = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    msg = bad(open_checked, data, "inputs.images[2]", BIG)
    assert msg.startswith("inputs.images[2]:") and "not a supported image" in msg
    assert bad(prepare_image_string, b64(data), "inputs", SPEC, BIG, BIG).startswith("inputs:")


def test_base64_of_text():
    text = base64.b64encode(b"hello world, this is not an image").decode()
    msg = bad(prepare_image_string, text, "inputs", SPEC, max_bytes=BIG, max_pixels=BIG)
    assert "not a supported image" in msg
    assert "not a supported image" in bad(open_checked, b"", "inputs", BIG)


def test_zero_dimension_header():
    assert bad(open_checked, png_header_only(0, 10), "inputs", BIG).startswith("inputs:")


# ---------------------------------------------------------------------------------------------------------------
# formats
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,kwargs", [("JPEG", {"quality": 95}), ("PNG", {}), ("GIF", {}), ("WEBP", {}),
                                        ("BMP", {})])
def test_supported_formats_load(fmt, kwargs):
    img = make_image(4, size=(80, 60))
    data = encode(img, fmt, **kwargs)
    assert open_checked(data, "inputs", BIG).format == fmt
    px = load_pixels(data, "inputs", SPEC, BIG)
    assert px.shape == (32, 32, 3) and px.dtype == np.uint8
    expected = np.asarray(img.resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32)
    tolerance = 40 if fmt in ("GIF", "JPEG", "WEBP") else 0.5  # lossy / palette formats
    assert np.abs(px.astype(np.float32) - expected).mean() < tolerance
    # through base64 too
    np.testing.assert_array_equal(prepare_image_string(b64(data), "inputs", SPEC, BIG, BIG), px)


@pytest.mark.parametrize("fmt", ["TIFF", "ICO", "PPM"])
def test_unsupported_formats_refused(fmt):
    data = encode(make_image(5, size=(32, 32)), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # PIL itself would open it
    msg = bad(open_checked, data, "inputs[0]", BIG)  # never handed to PIL's plugin for that format
    assert msg.startswith("inputs[0]:") and "not a supported image (JPEG, PNG, GIF, WebP or BMP)" in msg
    assert "not a supported image" in bad(load_pixels, data, "inputs", SPEC, BIG)


def test_load_pixels_squashes_to_spec():
    data = encode(make_image(6, size=(120, 40)), "PNG")
    assert load_pixels(data, "inputs", ImageSpec(24, 48), BIG).shape == (24, 48, 3)


def test_jpeg_draft_only_when_enabled_and_large():
    img = make_image(7, size=(512, 384))
    data = encode(img, "JPEG", quality=95)
    full = load_pixels(data, "inputs", SPEC, BIG)
    drafted = load_pixels(data, "inputs", ImageSpec(32, 32, jpeg_draft_factor=4.0), BIG)
    assert drafted.shape == full.shape
    assert np.abs(drafted.astype(int) - full.astype(int)).mean() < 20  # approximately the same picture
    # below the factor, no draft: identical to the exact path
    same = load_pixels(data, "inputs", ImageSpec(32, 32, jpeg_draft_factor=100.0), BIG)
    np.testing.assert_array_equal(same, full)
