"""The HTTP contract of POST /generate without Ray: body parsing, Accept negotiation, encoding."""

import base64
import io
import json

import numpy as np
import pytest
from diffsparse.runtime.pipeline import GenerationResult
from PIL import Image

from diffsparse.serve.schema import NPZ, PNG, Generated, RequestError, encode, negotiate, parse_generate


def _body(**fields) -> bytes:
    return json.dumps(fields).encode()


def test_a_full_request_is_parsed():
    r = parse_generate(_body(class_labels=[3, 1], seed=7, guidance_scale=2, scale=4, columns=1))
    assert (r.class_labels, r.seed, r.guidance_scale, r.scale, r.columns) == ([3, 1], 7, 2.0, 4, 1)
    assert isinstance(r.guidance_scale, float)
    r = parse_generate(_body(class_labels=[0]))
    assert (r.seed, r.guidance_scale, r.scale, r.columns, r.conditioning) == (0, None, 1, None, {})


def test_conditioning_arrays_from_nested_lists_and_base64():
    emb = np.arange(12, dtype=np.float32).reshape(2, 3, 2) / 7
    encoded = {"dtype": "float32", "shape": [2, 3, 2], "base64": base64.b64encode(emb.astype("<f4").tobytes()).decode()}
    r = parse_generate(_body(conditioning={"prompt_embeds": encoded, "mask": [[1, 1, 0], [1, 0, 0]]}))
    np.testing.assert_array_equal(r.conditioning["prompt_embeds"], emb)
    assert r.conditioning["prompt_embeds"].dtype == np.float32
    np.testing.assert_array_equal(r.conditioning["mask"], [[1, 1, 0], [1, 0, 0]])


@pytest.mark.parametrize("body, message", [
    (b"{not json", "malformed JSON"),
    (b"\xff\xfe", "malformed JSON"),
    (b'{"class_labels": [1], "guidance_scale": NaN}', "NaN is not a JSON number"),
    (b'{"class_labels": [1], "guidance_scale": Infinity}', "Infinity is not a JSON number"),
    (b"[1, 2]", "must be a JSON object"),
    (_body(labels=[1]), r"unknown field\(s\) \['labels'\]"),
    (_body(class_labels=3), "class_labels must be a list"),
    (_body(seed=1), "nothing to generate"),
    (_body(class_labels=[1], seed=-1), r"seed must be a whole number in \[0, 2\*\*63 - 1\]"),
    (_body(class_labels=[1], seed=1.5), "seed must be a whole number"),
    (_body(class_labels=[1], seed=True), "seed must be a whole number"),
    (_body(class_labels=[1], guidance_scale="4"), "guidance_scale must be a finite number"),
    (_body(class_labels=[1], scale=0), r"scale must be a whole number in \[1, 16\]"),
    (_body(class_labels=[1], columns=0), "columns must be a whole number"),
    (_body(conditioning=[1, 2]), "conditioning must be an object"),
    (_body(conditioning={"e": [[1, 2], [3]]}), "'e' is not a rectangular array"),
    (_body(conditioning={"e": [["a"]]}), "'e' must hold numbers only"),
    (_body(conditioning={"e": 3}), "'e' must be an array"),
    (_body(conditioning={"e": {"dtype": "float32", "shape": [2]}}), "exactly the keys"),
    (_body(conditioning={"e": {"dtype": "complex64", "shape": [2], "base64": ""}}), "dtype must be one of"),
    (_body(conditioning={"e": {"dtype": "float32", "shape": [2], "base64": "AAAA"}}), "3 bytes do not fill shape"),
    (_body(conditioning={"e": {"dtype": "float32", "shape": [1], "base64": "***"}}), "not valid base64"),
    (_body(conditioning={"e": {"dtype": "float32", "shape": [-1], "base64": ""}}), "shape must be a list of whole"),
])
def test_malformed_bodies_are_refused_with_400_and_the_reason(body, message):
    with pytest.raises(RequestError, match=message) as e:
        parse_generate(body)
    assert e.value.status == 400


@pytest.mark.parametrize("accept, media", [
    (None, PNG), ("", PNG), ("*/*", PNG), ("image/png", PNG), ("image/*", PNG), (NPZ, NPZ),
    ("application/octet-stream", NPZ), ("application/npz", NPZ), ("text/html, application/x-npz;q=0.5", NPZ),
    ("image/png;q=0.2, application/x-npz;q=0.9", NPZ), ("application/x-npz, image/png", NPZ),
    ("image/png, application/x-npz", PNG), ("application/x-npz;q=0, */*;q=0.1", PNG),
])
def test_accept_chooses_the_response_type(accept, media):
    assert negotiate(accept) == media


@pytest.mark.parametrize("accept", ["text/html", "application/json", "image/png;q=0"])
def test_an_unservable_accept_is_406(accept):
    with pytest.raises(RequestError, match="ask for image/png .* or application/x-npz") as e:
        negotiate(accept)
    assert e.value.status == 406


def test_png_is_the_runtime_grid_and_npz_holds_the_arrays():
    rng = np.random.default_rng(0)
    samples = rng.uniform(-1.2, 1.2, (3, 1, 8, 8)).astype(np.float32)
    gen = Generated(samples, np.array([4, 5, 6]), seed=9, guidance_scale=1.5)
    png = Image.open(io.BytesIO(encode(gen, PNG, scale=2, columns=2)))
    expected = GenerationResult(samples, gen.class_labels, [], 0.0).grid(columns=2, scale=2)
    assert png.size == (2 * 8 * 2, 2 * 8 * 2)
    np.testing.assert_array_equal(np.asarray(png), np.asarray(expected))
    assert Image.open(io.BytesIO(encode(gen, PNG))).size == (3 * 8, 8)   # one row by default
    with np.load(io.BytesIO(encode(gen, NPZ))) as z:
        np.testing.assert_array_equal(z["samples"], samples)
        np.testing.assert_array_equal(z["images"], GenerationResult(samples, None, [], 0.0).images())
        np.testing.assert_array_equal(z["class_labels"], [4, 5, 6])
        assert int(z["seed"]) == 9 and float(z["guidance_scale"]) == 1.5
