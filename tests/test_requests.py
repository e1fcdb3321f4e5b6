"""``siglip.api.requests``: the spec's auto-detection table, explicit modes, error texts and limits (pure, no model)."""

from __future__ import annotations

import base64

import pytest
from conftest import b64, encode, make_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from siglip.api.errors import BadRequest
from siglip.api.requests import MISSING_LABELS, Limits, ParsedRequest, detect_mode, parse_request
from siglip.api.schemas import DEFAULT_TEMPLATE, MODES

PNG_B64 = b64(encode(make_image(1, size=(16, 16))))
PNG_DATA_URI = "data:image/png;base64," + PNG_B64
URL = "https://example.com/cat.jpg"
UNKNOWN_MODE = "Unknown mode: invalid_mode. Supported: zero_shot, image_embedding, text_embedding, similarity"


def bad(inputs, parameters=None, endpoint_mode=None, limits: Limits | None = None) -> str:
    with pytest.raises(BadRequest) as info:
        parse_request(inputs, parameters, endpoint_mode, limits)
    assert info.value.status == 400
    return info.value.message


# ---------------------------------------------------------------------------------------------------------------
# auto-detection, in the spec's order
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("inputs", [
    {"image": URL, "texts": ["a", "b"]},
    {"images": [URL, PNG_B64], "texts": ["a"]},
    {"image": URL, "text": "a"},
    {"images": [URL], "text": "a"},
])
def test_row1_similarity_keys(inputs):
    assert detect_mode(inputs, {}) == "similarity"
    # similarity wins over candidate_labels (row 1 before row 2)
    assert detect_mode(inputs, {"candidate_labels": ["x"]}) == "similarity"
    parsed = parse_request(inputs, {})
    assert parsed.mode == "similarity"
    assert parsed.texts == tuple([inputs["text"]] if "text" in inputs else inputs["texts"])
    assert len(parsed.images) == (1 if "image" in inputs else len(inputs["images"]))


def test_row1_needs_both_kinds_of_key():
    assert detect_mode({"image": URL}, {}) == "image_embedding"
    assert detect_mode({"texts": ["a"]}, {}) == "image_embedding"
    assert "Unsupported image input type: <class 'dict'>" in bad({"image": URL})


def test_row2_candidate_labels_present():
    assert detect_mode(URL, {"candidate_labels": ["a"]}) == "zero_shot"
    parsed = parse_request(URL, {"candidate_labels": ["a", "b"]})
    assert parsed.mode == "zero_shot" and parsed.labels == ("a", "b") and not parsed.batched
    assert parsed.texts == tuple(DEFAULT_TEMPLATE.format(x) for x in ("a", "b"))
    # even text-looking inputs go to zero_shot when labels are present (row 2 before row 3)
    assert detect_mode("a cat", {"candidate_labels": ["a"]}) == "zero_shot"
    batch = parse_request([URL, PNG_B64], {"candidate_labels": ["a"]})
    assert batch.batched and [i.where for i in batch.images] == ["inputs[0]", "inputs[1]"]


@pytest.mark.parametrize("params", [{"candidate_labels": None}, {"mode": "zero_shot"},
                                    {"mode": "zero_shot", "candidate_labels": None}])
def test_missing_candidate_labels_exact_error(params):
    assert detect_mode(URL, params) == "zero_shot" or params.get("mode") == "zero_shot"
    assert bad(URL, params) == MISSING_LABELS == "candidate_labels is required for zero-shot classification"
    assert bad(URL, {k: v for k, v in params.items() if k != "mode"}, endpoint_mode="zero_shot") == MISSING_LABELS


def test_row3_text_single_string_and_list():
    assert detect_mode("a photo of a cat", {}) == "text_embedding"
    assert detect_mode(["a", "b c", "ceramic tile"], {}) == "text_embedding"
    parsed = parse_request(["a", "b"], {})
    assert parsed.mode == "text_embedding" and parsed.texts == ("a", "b") and parsed.images == ()
    assert parse_request("one text", None).texts == ("one text",)


def test_row3_length_threshold_500():
    assert detect_mode("x" * 499, {}) == "text_embedding"
    assert detect_mode("x" * 500, {}) == "image_embedding"
    assert detect_mode(["short", "y" * 500], {}) == "image_embedding"  # every item must be short


@pytest.mark.parametrize("url", ["http://example.com/a.jpg", "https://example.com/a.jpg", "HTTP://EXAMPLE.COM/A",
                                 "HTTPS://example.com/a.png", "Https://x.y/z", "hTtP://x.y/z"])
def test_row3_http_prefix_any_case_is_image(url):
    assert detect_mode(url, {}) == "image_embedding"
    assert detect_mode([url], {}) == "image_embedding"
    assert detect_mode(["a cat", url], {}) == "image_embedding"
    parsed = parse_request(url, {})
    assert parsed.images[0].value == url and parsed.images[0].where == "inputs"


def test_row3_base64_image_and_data_uri_are_images():
    assert len(PNG_B64) < 500
    assert detect_mode(PNG_B64, {}) == "image_embedding"
    assert detect_mode(PNG_DATA_URI, {}) == "image_embedding"
    assert detect_mode([PNG_B64, PNG_DATA_URI], {}) == "image_embedding"
    assert parse_request(PNG_DATA_URI, {}).mode == "image_embedding"


def test_row3_base64_of_plain_text_is_text():
    s = base64.b64encode(b"hello world").decode()
    assert s == "aGVsbG8gd29ybGQ="
    assert detect_mode(s, {}) == "text_embedding"
    assert detect_mode("SGVsbG8", {}) == "text_embedding"
    assert parse_request(s, {}).texts == (s,)


def test_row4_otherwise_image_embedding():
    assert detect_mode(None, {}) == "image_embedding"
    assert detect_mode(42, {}) == "image_embedding"
    assert detect_mode(["a", 1], {}) == "image_embedding"
    assert detect_mode([], {}) == "image_embedding"


def test_empty_list_is_an_error():
    assert bad([]) == "inputs must not be an empty list"
    assert bad([], {"mode": "text_embedding"}) == "inputs must not be an empty list"
    assert bad([], {"candidate_labels": ["a"]}) == "inputs must not be an empty list"


# ---------------------------------------------------------------------------------------------------------------
# explicit modes
# ---------------------------------------------------------------------------------------------------------------
def test_explicit_mode_overrides_detection():
    assert parse_request("a cat", {"mode": "image_embedding"}).images[0].value == "a cat"
    assert parse_request(URL, {"mode": "text_embedding"}).texts == (URL,)
    assert parse_request("x" * 600, {"mode": "text_embedding"}).mode == "text_embedding"
    # candidate_labels present but another mode named: the mode wins, labels are ignored
    parsed = parse_request(["a", "b"], {"mode": "text_embedding", "candidate_labels": ["x"]})
    assert parsed.mode == "text_embedding" and parsed.labels == ()
    assert parse_request("a", {"mode": None}).mode == "text_embedding"
    assert parse_request({"image": URL, "texts": ["a"]}, {"mode": "similarity"}).mode == "similarity"


def test_endpoint_mode():
    assert parse_request(URL, {}, endpoint_mode="image_embedding").mode == "image_embedding"
    assert parse_request("a cat", {}, endpoint_mode="image_embedding").images[0].value == "a cat"
    assert parse_request(URL, {"mode": "text_embedding"}, endpoint_mode="text_embedding").texts == (URL,)
    msg = bad(URL, {"mode": "text_embedding"}, endpoint_mode="image_embedding")
    assert "text_embedding" in msg and "image_embedding" in msg


def test_unknown_mode_exact_error():
    assert bad(URL, {"mode": "invalid_mode"}) == UNKNOWN_MODE
    assert bad(URL, {"mode": "invalid_mode"}, endpoint_mode="image_embedding") == UNKNOWN_MODE
    assert bad(URL, {"mode": 3}).startswith("Unknown mode: 3.")
    assert bad(URL, {"mode": "Zero_Shot"}).startswith("Unknown mode: Zero_Shot.")


# ---------------------------------------------------------------------------------------------------------------
# errors naming the offending item
# ---------------------------------------------------------------------------------------------------------------
def test_invalid_image_type_exact_error():
    assert bad(None) == "Unsupported image input type: <class 'NoneType'>"
    assert bad(None, {"mode": "image_embedding"}) == "Unsupported image input type: <class 'NoneType'>"
    assert bad(None, {"candidate_labels": ["a"]}) == "Unsupported image input type: <class 'NoneType'>"
    assert bad(42) == "Unsupported image input type: <class 'int'>"


def test_errors_name_the_index():
    assert bad([URL, URL, None]) == "Unsupported image input type: <class 'NoneType'> (inputs[2])"
    assert "inputs[1]" in bad([URL, "  "])
    assert bad(["a", "b", 3], {"mode": "text_embedding"}) == "Unsupported text input type: <class 'int'> (inputs[2])"
    assert "candidate_labels[1]" in bad(URL, {"candidate_labels": ["a", 2]})
    assert "inputs.images[1]" in bad({"images": [URL, None], "texts": ["a"]})
    assert "inputs.texts[0]" in bad({"image": URL, "texts": [None]})
    assert "inputs.text" in bad({"image": URL, "text": 5})


def test_limits():
    limits = Limits(max_images=2, max_texts=3, max_text_chars=10)
    assert len(parse_request([URL, URL], {}, limits=limits).images) == 2
    assert "3 images" in bad([URL, URL, URL], {}, limits=limits)
    assert "SIGLIP_MAX_IMAGES_PER_REQUEST" in bad([URL] * 3, {"candidate_labels": ["a"]}, limits=limits)
    assert "SIGLIP_MAX_IMAGES_PER_REQUEST" in bad({"images": [URL] * 3, "texts": ["a"]}, limits=limits)

    assert parse_request(["a", "b", "c"], {}, limits=limits).texts == ("a", "b", "c")
    assert "SIGLIP_MAX_TEXTS_PER_REQUEST" in bad(["a", "b", "c", "d"], {}, limits=limits)
    assert "SIGLIP_MAX_TEXTS_PER_REQUEST" in bad(URL, {"candidate_labels": list("abcd")}, limits=limits)
    assert "SIGLIP_MAX_TEXTS_PER_REQUEST" in bad({"image": URL, "texts": list("abcd")}, limits=limits)

    assert parse_request("x" * 10, {"mode": "text_embedding"}, limits=limits).texts == ("x" * 10,)
    msg = bad(["ok", "x" * 11], {"mode": "text_embedding"}, limits=limits)
    assert "inputs[1]" in msg and "SIGLIP_MAX_TEXT_CHARS" in msg
    assert "candidate_labels[0]" in bad(URL, {"candidate_labels": ["y" * 11]}, limits=limits)


def test_candidate_labels_validation():
    assert bad(URL, {"candidate_labels": []}) == "candidate_labels must not be empty"
    assert "list of strings" in bad(URL, {"candidate_labels": "cat"})
    assert "list of strings" in bad(URL, {"candidate_labels": {"a": 1}})


def test_parameters_must_be_an_object():
    assert "parameters must be a JSON object" in bad(URL, [1])
    assert "parameters must be a JSON object" in bad(URL, "zero_shot")
    assert parse_request(URL, None).mode == "image_embedding"


def test_template_errors():
    ok = parse_request(URL, {"candidate_labels": ["a"], "hypothesis_template": "{} it is"})
    assert ok.texts == ("a it is",)
    assert "hypothesis_template" in bad(URL, {"candidate_labels": ["a"], "hypothesis_template": "no slot"})
    for template in ["{} and {}", "{name} {}", "{0} {}", "{:d} {}", "{} {"]:
        msg = bad(URL, {"candidate_labels": ["a"], "hypothesis_template": template})
        assert "hypothesis_template" in msg, template
    assert "hypothesis_template" in bad(URL, {"candidate_labels": ["a"], "hypothesis_template": 5})
    # braces in labels are never interpreted
    assert parse_request(URL, {"candidate_labels": ["{x}"]}).texts == ("This is a photo of {x}.",)


@pytest.mark.parametrize("template", [
    "{[x]}{}",  # TypeError on a str label
    "{.foo}{}",  # AttributeError
    "{.upper}{}", "{[0]}{}", "{!r}{}", "{:>5}",  # lookups, conversions, format specs run on the label
    "{{}}",  # no field at all: the label would silently vanish
    "{0:>999999999}{{}}",  # a gigabyte of padding per label
    "{:>999999999}{}",
])
def test_template_that_cannot_take_the_label(template):
    msg = bad(URL, {"candidate_labels": ["", "cat"], "hypothesis_template": template})
    assert "hypothesis_template" in msg


def test_template_length_limit_and_repeated_field():
    limits = Limits(max_images=64, max_texts=1024, max_text_chars=20)
    assert "SIGLIP_MAX_TEXT_CHARS" in bad(URL, {"candidate_labels": ["a"], "hypothesis_template": "{}" + "x" * 19},
                                          limits=limits)
    parsed = parse_request(URL, {"candidate_labels": ["a"], "hypothesis_template": "{0}, {{literal}}"})
    assert parsed.texts == ("a, {literal}",)
    # exactly one field: a repeated one is refused at parse time like "{}{}", naming the template
    for template in ("{0} or {0}", "{}{}"):
        msg = bad(URL, {"candidate_labels": ["a"], "hypothesis_template": template})
        assert "hypothesis_template must contain exactly one {}" in msg and "2 fields" in msg, msg


def test_top_k_and_function_to_apply():
    p = parse_request(URL, {"candidate_labels": ["a"], "top_k": 2, "function_to_apply": "sigmoid"}).params
    assert p.top_k == 2 and p.function_to_apply == "sigmoid"
    p = parse_request(URL, {"candidate_labels": ["a"]}).params
    assert p.top_k is None and p.function_to_apply == "softmax" and p.hypothesis_template == DEFAULT_TEMPLATE
    assert parse_request(URL, {"candidate_labels": ["a"], "function_to_apply": "none"}).params.function_to_apply
    for top_k in (0, -1, "2", 1.5, True):
        assert bad(URL, {"candidate_labels": ["a"], "top_k": top_k}).startswith("parameters.top_k"), top_k
    for fn in ("relu", "SOFTMAX", 1, None):
        assert bad(URL, {"candidate_labels": ["a"], "function_to_apply": fn}).startswith(
            "parameters.function_to_apply"), fn
    # unknown keys are ignored, as the HF endpoint contract does
    assert parse_request(URL, {"candidate_labels": ["a"], "foo": 1}).mode == "zero_shot"


def test_similarity_errors():
    assert "not both" in bad({"image": URL, "images": [URL], "texts": ["a"]})
    assert "not both" in bad({"image": URL, "text": "a", "texts": ["a"]})
    assert "inputs.text or inputs.texts" in bad({"image": URL}, {"mode": "similarity"})
    assert "inputs.image or inputs.images" in bad({"texts": ["a"]}, {"mode": "similarity"})
    assert "object" in bad(URL, {"mode": "similarity"})
    assert "object" in bad(["a"], {}, endpoint_mode="similarity")
    assert "inputs.texts must not be an empty list" == bad({"image": URL, "texts": []})
    assert "inputs.images must not be an empty list" == bad({"images": [], "texts": ["a"]})


def test_similarity_parsed_fields():
    parsed = parse_request({"images": [URL, PNG_B64], "texts": ["a", "b", "c"]}, {})
    assert [i.where for i in parsed.images] == ["inputs.images[0]", "inputs.images[1]"]
    assert [i.value for i in parsed.images] == [URL, PNG_B64]
    assert parsed.texts == ("a", "b", "c") and parsed.labels == ()
    single = parse_request({"image": URL, "text": "a"}, {})
    assert single.images[0].where == "inputs.image" and single.texts == ("a",)


# ---------------------------------------------------------------------------------------------------------------
# property: any JSON-like body ends in a ParsedRequest or a BadRequest, never anything else
# ---------------------------------------------------------------------------------------------------------------
KEYS = st.sampled_from(["mode", "candidate_labels", "image", "images", "text", "texts", "hypothesis_template",
                        "top_k", "function_to_apply", "x"]) | st.text(max_size=8)
SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
           | st.text(max_size=40) | st.sampled_from([*MODES, "invalid_mode", URL, PNG_B64, PNG_DATA_URI,
                                                    "{}", "{.x}{}", "{[a]}{}", "{} {0}", "{{}}", "{0}{0}", "data:,x"]))
JSON = st.recursive(SCALARS, lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(KEYS, children, max_size=4), max_leaves=12)
IMAGE_STRINGS = st.sampled_from([URL, PNG_B64, PNG_DATA_URI, "a cat", " ", ""])
INPUTS = (JSON | IMAGE_STRINGS | st.lists(IMAGE_STRINGS | JSON, max_size=4)
          | st.dictionaries(KEYS, IMAGE_STRINGS | st.lists(IMAGE_STRINGS, max_size=3) | JSON, max_size=4))
TEMPLATES = st.sampled_from([DEFAULT_TEMPLATE, "{}", "{0}", "{.x}{}", "{[a]}{}", "{:>{}}", "{!r}{}", "{{}}",
                             "{} {}", "{} {0}", "{", "}", "{x}", "{0:>99999}{{}}"]) | st.text(max_size=12)
PARAMETERS = JSON | st.fixed_dictionaries({}, optional={
    "mode": st.sampled_from([*MODES, "invalid_mode"]) | JSON,
    "candidate_labels": st.lists(st.text(max_size=10), max_size=3) | JSON,
    "hypothesis_template": TEMPLATES | JSON,
    "top_k": st.integers(-2, 5) | JSON, "function_to_apply": st.sampled_from(["softmax", "sigmoid", "none"]) | JSON})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs=INPUTS, parameters=PARAMETERS, endpoint_mode=st.none() | st.sampled_from(MODES))
def test_parse_request_only_raises_bad_request(inputs, parameters, endpoint_mode):
    limits = Limits(max_images=3, max_texts=3, max_text_chars=50)
    try:
        parsed = parse_request(inputs, parameters, endpoint_mode, limits)
    except BadRequest as exc:
        assert isinstance(exc.message, str) and exc.message
        return
    assert isinstance(parsed, ParsedRequest)
    assert parsed.mode in MODES
    assert endpoint_mode is None or parsed.mode == endpoint_mode
    assert all(isinstance(t, str) for t in parsed.texts)
    assert all(isinstance(i.value, str) and i.value.strip() for i in parsed.images)
    if parsed.mode == "zero_shot":
        assert parsed.images and parsed.labels and len(parsed.texts) == len(parsed.labels)
    if parsed.mode in ("image_embedding", "similarity"):
        assert parsed.images and len(parsed.images) <= 3
    if parsed.mode in ("text_embedding", "similarity"):
        assert parsed.texts and len(parsed.texts) <= 3


@settings(max_examples=150, deadline=None)
@given(inputs=JSON, parameters=st.dictionaries(KEYS, JSON, max_size=4))
def test_detect_mode_total(inputs, parameters):
    assert detect_mode(inputs, parameters) in MODES


@settings(max_examples=300, deadline=None)
@given(inputs=IMAGE_STRINGS | st.lists(IMAGE_STRINGS, min_size=1, max_size=3),
       labels=st.lists(st.text(max_size=10), min_size=1, max_size=3),
       template=TEMPLATES | st.text(alphabet="{}[].!:>0ars x", max_size=10))
def test_zero_shot_templates_only_raise_bad_request(inputs, labels, template):
    params = {"candidate_labels": labels, "hypothesis_template": template}
    try:
        parsed = parse_request(inputs, params, limits=Limits(max_images=3, max_texts=3, max_text_chars=50))
    except BadRequest:
        return
    assert parsed.mode == "zero_shot" and parsed.labels == tuple(labels)
    for label, text in zip(labels, parsed.texts):
        assert label in text  # the label really is in what the model sees


def test_huge_lists_are_refused_before_any_per_item_work():
    import time

    t0 = time.perf_counter()
    with pytest.raises(BadRequest, match="100000 inputs in one request"):
        parse_request(["aaaa"] * 100_000, None)
    assert time.perf_counter() - t0 < 0.1
