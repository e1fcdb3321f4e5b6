from conftest import b64, encode, make_image


def test_service_answers_all_four_modes(service):
    img = b64(encode(make_image(1)))
    r = service.post("/", {"inputs": img, "parameters": {"candidate_labels": ["a", "b"]}})
    assert r.status_code == 200, r.text
    assert abs(sum(x["score"] for x in r.json()) - 1) < 1e-6
