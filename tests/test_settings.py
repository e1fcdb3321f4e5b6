"""``Settings.from_env``: defaults, parsing, validation naming the variable, tokens kept out of repr."""

from __future__ import annotations

import dataclasses
import re

import pytest

from siglip.settings import MB, Settings


def test_defaults_from_empty_env():
    s = Settings.from_env({})
    assert s == Settings()
    assert s.model == "google/siglip2-base-patch16-512"
    assert (s.device, s.dtype, s.compile) == ("auto", "auto", False)
    assert s.max_images_per_request == 64 and s.max_texts_per_request == 1024 and s.max_text_chars == 2000
    assert s.max_image_bytes == 20 * MB and s.max_image_pixels == 40_000_000
    assert s.allow_private_urls is False and s.url_allowlist == () and s.api_token == ()
    assert s.text_cache_size == 4096 and s.fetch_max_redirects == 3


def test_unrelated_and_blank_variables_are_ignored():
    s = Settings.from_env({"SIGLIP_MAX_BATCH_SIZE": "   ", "SIGLIP_DTYPE": "", "PATH": "/bin", "MAX_BATCH_SIZE": "9",
                           "siglip_max_batch_size": "9"})
    assert s == Settings()


def test_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("SIGLIP_MAX_BATCH_SIZE", "7")
    assert Settings.from_env().max_batch_size == 7


def test_ints():
    s = Settings.from_env({"SIGLIP_MAX_BATCH_SIZE": "32", "SIGLIP_MAX_IMAGE_PIXELS": "1_000_000",
                           "SIGLIP_TEXT_CACHE_SIZE": "0", "SIGLIP_FETCH_MAX_REDIRECTS": " 0 "})
    assert s.max_batch_size == 32 and s.max_image_pixels == 1_000_000
    assert s.text_cache_size == 0 and s.fetch_max_redirects == 0
    assert isinstance(s.max_batch_size, int)


def test_floats():
    s = Settings.from_env({"SIGLIP_REQUEST_TIMEOUT_S": "2.5", "SIGLIP_FETCH_CONNECT_TIMEOUT_S": "1",
                           "SIGLIP_JPEG_DRAFT_FACTOR": "2"})
    assert s.request_timeout_s == 2.5 and s.fetch_connect_timeout_s == 1.0 and s.jpeg_draft_factor == 2.0
    assert isinstance(s.fetch_connect_timeout_s, float)


@pytest.mark.parametrize("raw,value", [("1", True), ("true", True), ("TRUE", True), ("yes", True), ("on", True),
                                       ("0", False), ("false", False), ("No", False), ("off", False)])
def test_bools(raw, value):
    s = Settings.from_env({"SIGLIP_ALLOW_PRIVATE_URLS": raw, "SIGLIP_COMPILE": raw})
    assert s.allow_private_urls is value and s.compile is value


def test_comma_lists():
    s = Settings.from_env({"SIGLIP_URL_ALLOWLIST": " cdn.example.com, .images.test ,, ",
                           "SIGLIP_API_TOKEN": "tok-a,tok-b"})
    assert s.url_allowlist == ("cdn.example.com", ".images.test")
    assert s.api_token == ("tok-a", "tok-b")
    assert Settings.from_env({"SIGLIP_API_TOKEN": "single"}).api_token == ("single",)


def test_strings():
    s = Settings.from_env({"SIGLIP_MODEL": "/models/siglip", "SIGLIP_DEVICE": "cuda:1", "SIGLIP_DTYPE": "bfloat16"})
    assert (s.model, s.device, s.dtype) == ("/models/siglip", "cuda:1", "bfloat16")
    assert Settings.from_env({"SIGLIP_DEVICE": "cpu", "SIGLIP_DTYPE": "float16"}).dtype == "float16"


@pytest.mark.parametrize("name,raw", [
    ("SIGLIP_MAX_BATCH_SIZE", "many"),
    ("SIGLIP_MAX_BATCH_SIZE", "1.5"),
    ("SIGLIP_MAX_BATCH_SIZE", "0"),
    ("SIGLIP_MAX_BATCH_SIZE", "-4"),
    ("SIGLIP_MAX_IMAGE_PIXELS", "40M"),
    ("SIGLIP_MAX_TEXT_CHARS", "0"),
    ("SIGLIP_MAX_BODY_BYTES", "-1"),
    ("SIGLIP_DECODE_THREADS", "0"),
    ("SIGLIP_REQUEST_TIMEOUT_S", "soon"),
    ("SIGLIP_REQUEST_TIMEOUT_S", "0"),
    ("SIGLIP_REQUEST_TIMEOUT_S", "-5"),
    ("SIGLIP_REQUEST_TIMEOUT_S", "nan"),
    ("SIGLIP_FETCH_TOTAL_TIMEOUT_S", "-1"),
    ("SIGLIP_FETCH_CONNECT_TIMEOUT_S", "inf"),
    ("SIGLIP_JPEG_DRAFT_FACTOR", "-2"),
    ("SIGLIP_KEEP_ALIVE_S", "-1"),
    ("SIGLIP_KEEP_ALIVE_S", "inf"),
    ("SIGLIP_TEXT_CACHE_SIZE", "-1"),
    ("SIGLIP_FETCH_MAX_REDIRECTS", "-1"),
    ("SIGLIP_COMPILE", "maybe"),
    ("SIGLIP_ALLOW_PRIVATE_URLS", "2"),
    ("SIGLIP_DEVICE", "tpu"),
    ("SIGLIP_DTYPE", "float64"),
    ("SIGLIP_DTYPE", "fp32"),
])
def test_invalid_values_name_the_variable(name, raw):
    with pytest.raises(ValueError) as info:
        Settings.from_env({name: raw})
    assert name in str(info.value)


def test_api_token_never_in_repr():
    s = Settings.from_env({"SIGLIP_API_TOKEN": "hunter2-secret,other-s3cret", "SIGLIP_MAX_BATCH_SIZE": "8"})
    for text in (repr(s), str(s), f"{s}", f"{s!r}"):
        assert "hunter2" not in text and "s3cret" not in text
        assert "max_batch_size=8" in text
        assert "<2 token(s)>" in text
    assert "<0 token(s)>" in repr(Settings())


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().max_batch_size = 1  # type: ignore[misc]


@pytest.mark.parametrize("name", ["SIGLIP_API_TOKEN", "SIGLIP_URL_ALLOWLIST"])
def test_a_list_setting_that_lists_nothing_fails_instead_of_failing_open(name):
    with pytest.raises(ValueError, match=name):
        Settings.from_env({name: " , "})


def test_every_setting_is_in_the_readme_configuration_table():
    """docs/configuration.md's table (moved there from the README) lists exactly the settings."""
    from conftest import ROOT

    page = (ROOT / "docs" / "configuration.md").read_text()
    table = page.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    names = {f"SIGLIP_{f.name.upper()}" for f in dataclasses.fields(Settings)}
    rows = set(re.findall(r"^\| `(SIGLIP_\w+)` \|", table, flags=re.MULTILINE))
    assert names == rows, {"undocumented": names - rows, "documented but unknown": rows - names}
