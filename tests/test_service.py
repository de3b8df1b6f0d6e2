"""The BentoML service. Most of it in-process (Starlette's TestClient on the service's own ASGI app, its settings
read when the app starts): answers agree with `tailwise predict` (multipart and raw bodies), every bad input gets a
4xx of one shape and one WARNING log record and the service goes on, overload gets 503 + Retry-After, draining
closes connections. A few tests start a real server (`tailwise serve`): a burst of concurrent requests is batched,
/metrics, the log, SIGTERM under load drops nothing, one-line start errors, a tampered model is refused;
`bentoml build` without torch."""

import functools
import io
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tailwise.serving.artifact import OnnxClassifier
from tailwise.serving.predict import predict_files

from conftest import free_port

REPO = Path(__file__).resolve().parent.parent
MAX_UPLOAD = 300_000  # TAILWISE_MAX_UPLOAD_BYTES of the test service
BRIGHTNESS = [10, 60, 100, 140, 190, 240]


def wait_ready(url, seconds=60, process=None):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready after {seconds} s")


def encode(image, fmt="PNG", **save_args):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def gray_png(level, size=(28, 28), seed=0):
    noise = np.random.default_rng(seed).integers(0, 12, size[::-1])
    return encode(Image.fromarray(np.clip(level + noise, 0, 255).astype(np.uint8)))


def png_claiming(width, height):
    """A PNG whose header claims width x height 8-bit gray pixels (the data is a stub)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def truncated_png():
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    return data[: len(data) // 2]


@pytest.fixture(scope="module")
def server_env(tiny_model_dir, tmp_path_factory):
    """Environment of the module's services: a private BENTOML_HOME, no tracking, the tiny model, a small upload
    limit."""
    return {"BENTOML_HOME": str(tmp_path_factory.mktemp("bentoml_home")), "BENTOML_DO_NOT_TRACK": "true",
            "TAILWISE_MODEL": str(tiny_model_dir), "TAILWISE_MAX_UPLOAD_BYTES": str(MAX_UPLOAD)}


@pytest.fixture(scope="module")
def service(server_env):
    """The service module, imported with the tiny model (the model is fixed at import; settings are not)."""
    with pytest.MonkeyPatch.context() as env:
        for key, value in server_env.items():
            env.setenv(key, value)
        from tailwise.serving import service

        assert service.MODEL_PATH.parent.name == "tiny"
        yield service


def in_process(service, **settings):
    """A started in-process client of the service's ASGI app, its settings from `settings` (TAILWISE_* values)."""
    from starlette.testclient import TestClient

    with pytest.MonkeyPatch.context() as env:
        for key, value in settings.items():
            env.setenv(key, str(value))
        client = TestClient(service.TailwiseClassifier.to_asgi(), raise_server_exceptions=False)
        client.__enter__()  # starts the app: the service is constructed here, reading the settings
    return client


@pytest.fixture(scope="module")
def client(service, server_env):
    """The default in-process service (TAILWISE_MAX_UPLOAD_BYTES = MAX_UPLOAD) for the module."""
    client = in_process(service, TAILWISE_MAX_UPLOAD_BYTES=MAX_UPLOAD)
    yield client
    client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Image files of several formats, sizes and modes, one class-like brightness each."""
    folder = tmp_path_factory.mktemp("images")
    files = {f"gray{level}.png": gray_png(level, seed=level) for level in BRIGHTNESS}
    files["rgb_64x48.jpg"] = encode(Image.fromarray(np.full((48, 64, 3), (200, 180, 90), np.uint8)), "JPEG")
    files["rgba.png"] = encode(Image.fromarray(np.dstack([np.full((20, 30, 3), 120, np.uint8),
                                                          np.full((20, 30), 128, np.uint8)]), "RGBA"))
    files["palette.gif"] = encode(Image.fromarray(np.full((28, 28), 50, np.uint8)).convert("P"), "GIF")
    files["sixteen_bit.png"] = encode(Image.fromarray(np.full((28, 28), 40000, np.uint16)))
    files["big_1000x900.png"] = encode(Image.fromarray(np.full((900, 1000), 200, np.uint8)))  # decoded in a thread
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return sorted(folder.iterdir())


def classify(http, files, data=None, route="/classify"):
    """POST to the in-process client `http`, or to the real server at URL `http`."""
    if isinstance(http, str):
        return httpx.post(f"{http}{route}", files=files, data=data, timeout=60)
    return http.post(route, files=files, data=data)


def assert_serving(http):
    """The service is alive and classifies a good image."""
    response = classify(http, {"image": ("ok.png", gray_png(200))})
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 3
    assert (httpx.get(f"{http}/livez") if isinstance(http, str) else http.get("/livez")).status_code == 200


def same_predictions(got, expected):
    assert [(p["label"], p["index"], p["group"]) for p in got] == [
        (p["label"], p["index"], p["group"]) for p in expected]
    np.testing.assert_allclose([p["probability"] for p in got], [p["probability"] for p in expected],
                               rtol=0, atol=5e-7)  # the service rounds to 6 decimals


# ------------------------------------------------------------------------------------------ torch-free

def test_service_imports_no_torch(server_env):
    code = ("import sys; from tailwise.serving import service; "
            "bad = [m for m in ('torch', 'tailwise.training', 'tailwise.export', 'training', 'export', 'serving') "
            "if m in sys.modules]; assert not bad, bad; "
            "print(service.MODEL_PATH.parent.name)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, **server_env})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "tiny"


def test_service_module_is_small():
    """The service class and its wiring; parsing, middleware, batching, shutdown, docs and settings live beside it."""
    assert len((REPO / "serving" / "service.py").read_text().splitlines()) <= 250


# ------------------------------------------------------------------------------------------ answers

def test_classify_agrees_with_tailwise_predict(client, tiny_model_dir, images):
    expected = {record["path"]: record["predictions"]
                for record in predict_files(OnnxClassifier(tiny_model_dir), [str(p) for p in images], top_k=3)}
    assert len({predictions[0]["label"] for predictions in expected.values()}) >= 3  # a non-trivial comparison
    for path in images:
        answer = classify(client, {"image": (path.name, path.read_bytes())}, {"top_k": "3"}).json()
        same_predictions(answer["predictions"], expected[str(path)])
        assert answer["provider"] == "CPUExecutionProvider"
        raw = client.post("/classify", content=path.read_bytes(), headers={"content-type": "image/whatever"})
        assert raw.json() == answer  # the raw body, whatever image type it claims: the same answer
    batch = classify(client, [("images", (p.name, p.read_bytes())) for p in images], route="/classify_batch").json()
    assert [r["index"] for r in batch["results"]] == list(range(len(images)))
    assert [r["filename"] for r in batch["results"]] == [p.name for p in images]   # issue 25 item 10
    for path, record in zip(images, batch["results"]):
        assert record["error"] is None
        same_predictions(record["predictions"], expected[str(path)])


def test_answers_carry_the_prediction_set_at_the_coverage_chosen(service, client, tiny_model_dir, images, tmp_path):
    """Every answer carries the prediction set `tailwise predict` gives (the tiny model is calibrated at 90 % and
    80 %) and `unsure`; TAILWISE_COVERAGE chooses the other calibrated coverage, or turns the sets off; one the
    model was not calibrated for is refused before the server starts."""
    from tailwise import UserError
    from tailwise.serving.server import server_command

    classifier = OnnxClassifier(tiny_model_dir)
    for level in (79, 99, 119):   # between two classes' brightness: the model is unsure
        (tmp_path / f"between{level}.png").write_bytes(gray_png(level))
    images = [*images, *sorted(tmp_path.glob("between*.png"))]
    files = [("images", (p.name, p.read_bytes())) for p in images] + [("images", ("bad.png", b"x"))]
    for coverage, settings in ((0.9, {}), (0.8, {"TAILWISE_COVERAGE": "0.8"}), ("off", {"TAILWISE_COVERAGE": "off"})):
        http = client if not settings else in_process(service, **settings)
        try:
            expected = list(predict_files(classifier, [str(p) for p in images], coverage=coverage))
            assert any(r["unsure"] for r in expected) or coverage == "off"   # a non-trivial comparison
            for path, record in zip(images, expected):
                answer = classify(http, {"image": (path.name, path.read_bytes())}).json()
                assert (answer["set"], answer["unsure"]) == (record["set"], record["unsure"]), path.name
            batch = classify(http, files, route="/classify_batch").json()["results"]
            assert [(r["set"], r["unsure"]) for r in batch] == [(r["set"], r["unsure"]) for r in expected] + [
                (None, None)]
            info = http.get("/model_info").json()
            assert info["coverage"] == (None if coverage == "off" else coverage)
            assert [lv["coverage"] for lv in info["prediction_sets"]["levels"]] == [0.9, 0.8]
        finally:
            if http is not client:
                http.__exit__(None, None, None)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TAILWISE_COVERAGE", "0.5")
        with pytest.raises(UserError, match=r"^TAILWISE_COVERAGE: coverage 0.5 is not calibrated for this model; "
                                            r"it has 0.9, 0.8"):
            server_command(tiny_model_dir, port=free_port())


def test_top_k_in_the_query_string_with_a_multipart_body(client):
    files = {"image": ("a.png", gray_png(240))}
    assert len(client.post("/classify?top_k=1", files=files).json()["predictions"]) == 1
    assert len(client.post("/classify?top_k=2", files=files, data={"top_k": "2"}).json()["predictions"]) == 2
    batch = client.post("/classify_batch?top_k=4", files=[("images", ("a.png", gray_png(10)))]).json()
    assert len(batch["results"][0]["predictions"]) == 4


def test_top_k_groups_and_rounding(client):
    answer = classify(client, {"image": ("a.png", gray_png(240))}, {"top_k": "5"}).json()
    assert [p["label"] for p in answer["predictions"]][:1] == ["eel"]  # brightest = last class of the toy model
    assert sorted(p["label"] for p in answer["predictions"]) == ["ant", "bee", "cat", "dog", "eel"]
    groups = {p["label"]: p["group"] for p in answer["predictions"]}
    assert groups == {"ant": "many", "bee": "medium", "cat": "few", "dog": "few", "eel": "few"}
    assert sum(p["probability"] for p in answer["predictions"]) == pytest.approx(1.0, abs=1e-5)
    assert all(round(p["probability"], 6) == p["probability"] for p in answer["predictions"])
    raw = client.post("/classify?top_k=2", content=gray_png(240), headers={"content-type": "image/png"}).json()
    assert [p["label"] for p in raw["predictions"]] == [p["label"] for p in answer["predictions"]][:2]


def test_classify_batch_reports_bad_files_and_classifies_the_others(client, images):
    files = [("images", ("a.png", images[0].read_bytes())), ("images", ("b.png", b"not an image")),
             ("images", ("c.png", b"")), ("images", ("d.png", images[1].read_bytes()))]
    results = classify(client, files, route="/classify_batch").json()["results"]
    assert [bool(r["predictions"]) for r in results] == [True, False, False, True]
    assert "images[1]: not an image" in results[1]["error"] and "images[2]: empty file" in results[2]["error"]
    single = classify(client, {"image": ("a.png", images[0].read_bytes())}).json()["predictions"]
    same_predictions(results[0]["predictions"], single)


def test_model_info_shows_the_settings_read_at_start(service):
    http = in_process(service, TAILWISE_BATCHING=0, TAILWISE_MAX_PIXELS=1000, TAILWISE_MAX_IN_FLIGHT=7,
                      TAILWISE_ORT_THREADS=2)
    try:
        info = http.post("/model_info", json={}).json()
        assert http.get("/model_info").json() == info          # GET too (issue 25 item 10)
        assert info["model"] == "tiny" and info["class_names"] == ["ant", "bee", "cat", "dog", "eel"]
        assert info["train_counts"] == [600, 300, 150, 40, 10]
        assert info["groups"] == ["many", "medium", "few", "few", "few"]
        assert info["metrics"] == {"top1": 0.9} and info["provider"] == "CPUExecutionProvider"
        assert info["input"]["height"] == 28 and info["batching"] is False and info["verified"] is True
        assert info["limits"]["max_pixels"] == 1000 and info["limits"]["max_in_flight"] == 7
        assert info["onnxruntime_threads"] == {"batch": 2, "one_image": [1, 2]}   # the faster lately (sessions.py)
        response = classify(http, {"image": ("a.png", gray_png(10, size=(40, 40)))})  # 1600 pixels > 1000
        assert response.status_code == 400 and "max_pixels=1000" in response.json()["error"]
        assert classify(http, {"image": ("a.png", gray_png(10))}).status_code == 200  # 784 pixels
    finally:
        http.__exit__(None, None, None)


def test_spinning_setting_chooses_what_runs_a_lone_image(service):
    """TAILWISE_ORT_SPINNING: "1" (the cores are the service's own): a lone image on the batch session's spinning
    threads; "0": on one thread; the default ("auto", test_model_info_shows_the_settings_read_at_start): both."""
    for value, one_image in (("1", 2), ("0", 1)):
        http = in_process(service, TAILWISE_ORT_THREADS=2, TAILWISE_ORT_SPINNING=value)
        try:
            assert http.get("/model_info").json()["onnxruntime_threads"] == {"batch": 2, "one_image": one_image}
            assert_serving(http)
        finally:
            http.__exit__(None, None, None)


def test_bad_settings_are_one_line_errors():
    from tailwise import UserError
    from tailwise.serving.settings import Settings

    assert Settings.from_env({}) == Settings()
    for env, message in [({"TAILWISE_MAX_PIXELS": "abc"}, "TAILWISE_MAX_PIXELS must be an integer, got 'abc'"),
                         ({"TAILWISE_MAX_IN_FLIGHT": "0"}, "TAILWISE_MAX_IN_FLIGHT must be >= 1, got 0"),
                         ({"TAILWISE_BATCHING": "yes"}, "TAILWISE_BATCHING must be 0 or 1, got 'yes'"),
                         ({"TAILWISE_ORT_SPINNING": "yes"},
                          "TAILWISE_ORT_SPINNING must be one of auto, 1, 0, got 'yes'")]:
        with pytest.raises(UserError, match="^" + message.replace("(", r"\(") + "$"):
            Settings.from_env(env)
    assert Settings.from_env({"TAILWISE_MAX_BATCH_SIZE": "8"}).max_in_flight == 8  # the default follows


# ------------------------------------------------------------------------------------------ bad input

def chunked_multipart(field, size, boundary="tailwiseboundary"):
    """A multipart body with one `size`-byte file, streamed without a Content-Length."""
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"big.png\"\r\n"
           "Content-Type: image/png\r\n\r\n").encode()
    for start in range(0, size, 65536):
        yield b"\x00" * min(65536, size - start)
    yield f"\r\n--{boundary}--\r\n".encode()


def one(image, name="a.png", **more):
    """httpx.post arguments for a multipart request with the bytes `image` as the image file."""
    return {"files": {"image": (name, image)}, **more}


@functools.cache
def big_png():
    """A 1500x1500 PNG: long enough to decode that concurrent requests overlap."""
    return encode(Image.fromarray(np.tile(np.arange(1500, dtype=np.uint16) % 256, (1500, 1)).astype(np.uint8)))


RAW = {"content-type": "image/png"}
MULTIPART = {"content-type": "multipart/form-data; boundary=tailwiseboundary"}
BAD_REQUESTS = {  # name: (route, () -> httpx.post keyword arguments, status, text the reply must contain)
    "non-image bytes": ("/classify", lambda: one(b"name,label\nfoo.png,3\n"), 400,
                        "image: not an image in a supported format"),
    "postscript": ("/classify", lambda: one(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 4 4\n", "a.eps"), 400,
                   "not an image in a supported format"),
    "truncated": ("/classify", lambda: one(truncated_png()), 400, "image: corrupt or truncated"),
    "empty upload": ("/classify", lambda: one(b""), 400, "image: empty file"),
    "100000x100000 header": ("/classify", lambda: one(png_claiming(100_000, 100_000)), 400,
                             "image: too many pixels"),  # Pillow's own limit, at the header
    "zero-filled 7100x7100": ("/classify", lambda: one(encode(Image.new("L", (7100, 7100)))), 400,
                              "7100x7100 image has more than max_pixels=50000000"),
    "float mode": ("/classify", lambda: one(encode(Image.fromarray(np.zeros((4, 4), np.float32)), "TIFF")), 400,
                   "unsupported image mode 'F'"),
    "oversized upload": ("/classify", lambda: one(b"\x00" * (MAX_UPLOAD + 1)), 413, f"over {MAX_UPLOAD} bytes"),
    "oversized chunked upload": ("/classify", lambda: {"content": chunked_multipart("image", MAX_UPLOAD + 1000),
                                                       "headers": MULTIPART}, 413, "TAILWISE_MAX_UPLOAD_BYTES"),
    "wrong field name": ("/classify", lambda: {"files": {"file": ("a.png", gray_png(100))}}, 400,
                         "unknown field 'file'; this API takes image (file), top_k"),
    "no image": ("/classify", lambda: {"files": {"top_k": (None, "3")}}, 400, "Field required"),
    "text instead of a file": ("/classify", lambda: {"files": {"image": (None, "http://127.0.0.1:9/x.png")}}, 400,
                               "field 'image' must be a file upload"),
    "file instead of top_k": ("/classify", lambda: {"files": {"image": ("a.png", gray_png(9)), "top_k": ("k", b"3")}},
                              400, "field 'top_k' must be a plain value"),
    "json body": ("/classify", lambda: {"json": {"image": "/etc/passwd"}}, 415, "send multipart/form-data"),
    "text body": ("/classify", lambda: {"content": b"x", "headers": {"content-type": "text/plain"}}, 415,
                  "send multipart/form-data (fields: image (file), top_k) or the image itself as the body"),
    "malformed multipart": ("/classify", lambda: {"content": b"--x\r\ngarbage", "headers": MULTIPART}, 400,
                            "multipart"),
    "top_k 0": ("/classify", lambda: one(gray_png(9), data={"top_k": "0"}), 400, "top_k"),
    "top_k above the classes": ("/classify", lambda: one(gray_png(9), data={"top_k": "6"}), 400,
                                "top_k must be an integer from 1 to 5 (this model's classes), got 6"),
    "top_k 1000": ("/classify", lambda: one(gray_png(9), data={"top_k": "1000"}), 400, "top_k"),
    "top_k text": ("/classify", lambda: one(gray_png(9), data={"top_k": "all"}), 400, "top_k"),
    "65 files": ("/classify_batch", lambda: {"files": [("images", (f"{i}.png", b"x")) for i in range(65)]}, 400,
                 "at most 64 items"),
    "no files": ("/classify_batch", lambda: {"files": {"top_k": (None, "3")}}, 400, "Field required"),
    "two files for image": ("/classify", lambda: {"files": [("image", ("a.png", gray_png(9)))] * 2}, 400,
                            "field 'image' takes one file"),
    "raw body, truncated": ("/classify", lambda: {"content": truncated_png(), "headers": RAW}, 400,
                            "image: corrupt or truncated"),
    "raw body, empty": ("/classify", lambda: {"content": b"", "headers": RAW}, 400, "image: empty file"),
    "raw body, unknown parameter": ("/classify?k=3", lambda: {"content": gray_png(9), "headers": RAW}, 400,
                                    "unknown query parameter 'k'"),
    "raw body, top_k text": ("/classify?top_k=x", lambda: {"content": gray_png(9), "headers": RAW}, 400, "top_k"),
    "multipart, unknown query parameter": ("/classify?k=1", lambda: one(gray_png(9)), 400,
                                           "unknown query parameter 'k'"),
    "multipart, top_k twice": ("/classify?top_k=1", lambda: one(gray_png(9), data={"top_k": "2"}), 400,
                               "top_k given twice, '1' in the query string and '2' in the form"),
    "batch, top_k text in the query": ("/classify_batch?top_k=x", lambda: {"files": {"images": ("a.png", gray_png(9))}},
                                       400, "top_k"),
    "raw body to /classify_batch": ("/classify_batch", lambda: {"content": gray_png(9), "headers": RAW}, 415,
                                    "send multipart/form-data (fields: images (file), top_k), not image/png"),
}




GOOD_REQUESTS = {  # name: (route, () -> httpx.post keyword arguments)
    "multipart": ("/classify", lambda: one(gray_png(60), data={"top_k": "2"})),
    "raw body": ("/classify?top_k=4", lambda: {"content": gray_png(190), "headers": RAW}),
    "batch with a bad file": ("/classify_batch", lambda: {"files": [("images", ("a.png", gray_png(10))),
                                                                    ("images", ("b.png", b"not an image")),
                                                                    ("images", ("c.png", gray_png(240)))]}),
}


def test_direct_dispatch_answers_as_the_typed_api(service, client):
    """Guard answers the classify paths itself (past BentoML's dispatch); with TAILWISE_DIRECT=0 BentoML's API
    does: every good and bad request gets the same status and body both ways."""
    bentoml_path = in_process(service, TAILWISE_MAX_UPLOAD_BYTES=MAX_UPLOAD, TAILWISE_DIRECT=0)
    try:
        for case, (route, arguments) in {**GOOD_REQUESTS, **{k: v[:2] for k, v in BAD_REQUESTS.items()}}.items():
            direct, typed = client.post(route, **arguments()), bentoml_path.post(route, **arguments())
            assert (direct.status_code, direct.json()) == (typed.status_code, typed.json()), case
            if direct.status_code == 200:  # BentoML's dispatch names itself in a Server header; Guard does not
                assert "server" not in direct.headers and typed.headers["server"].startswith("BentoML"), case
                assert direct.headers["content-length"] == str(len(direct.content))
    finally:
        bentoml_path.__exit__(None, None, None)


def test_a_pickle_body_is_refused_unread_both_ways(service, client):
    """BentoML's own client sends application/vnd.bentoml+pickle between services; from outside, a classify path
    refuses it with a 415 before reading it, whichever way the request is dispatched."""
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.makedirs, (str(Path(os.environ.get("TMPDIR", "/tmp")) / "tailwise-unpickled"),))

    body = {"content": pickle.dumps({"image": Boom()}), "headers": {"content-type": "application/vnd.bentoml+pickle"}}
    bentoml_path = in_process(service, TAILWISE_DIRECT=0)
    try:
        for http in (client, bentoml_path):
            response = http.post("/classify", **body)
            assert response.status_code == 415 and list(response.json()) == ["error"], response.text
        assert not (Path(os.environ.get("TMPDIR", "/tmp")) / "tailwise-unpickled").exists()
    finally:
        bentoml_path.__exit__(None, None, None)


def test_direct_dispatch_keeps_bentomls_cors_headers(service):
    """With BentoML's CORS on (http.cors in BENTOML_CONFIG_OPTIONS), a browser's request to a classify path gets
    Access-Control-Allow-Origin on its answer, good or bad, both ways (BentoML puts its CORS middleware inside
    Guard, where the direct answer never goes)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    origin = "http://example.com"
    cors = "services.TailwiseClassifier.http.cors.enabled=true"
    with BentoMLContainer.access_control_options.patch({"allow_origins": [origin], "allow_methods": ["POST"]}):  # a cached singleton
        for direct in (1, 0):
            http = in_process(service, TAILWISE_DIRECT=direct, TAILWISE_MAX_UPLOAD_BYTES=MAX_UPLOAD,
                              BENTOML_CONFIG_OPTIONS=cors)
            try:
                for route, arguments, status in (("/classify", one(gray_png(60)), 200),
                                                 ("/classify?top_k=2", {"content": gray_png(9), "headers": RAW}, 200),
                                                 ("/classify_batch", {"files": [("images", ("a.png", b"x"))]}, 200),
                                                 ("/classify", one(b"junk"), 400),
                                                 ("/classify", one(b"\x00" * (MAX_UPLOAD + 1)), 413),  # Guard's own
                                                 ("/classify", {"content": chunked_multipart("image", 2 * MAX_UPLOAD),
                                                                "headers": MULTIPART}, 413)):
                    arguments["headers"] = {**arguments.get("headers", {}), "origin": origin}
                    response = http.post(route, **arguments)
                    assert response.status_code == status, (direct, route, response.text)
                    assert response.headers.get("access-control-allow-origin") == origin, (direct, route, status)
            finally:
                http.__exit__(None, None, None)
        # Guard's 503: a browser reads its Retry-After only with the CORS headers on it
        http = in_process(service, TAILWISE_MAX_IN_FLIGHT=1, BENTOML_CONFIG_OPTIONS=cors)
        try:
            def send(i):               # a browser's preflights among the overload: answered, never refused
                if i % 4 == 3:
                    return http.options("/classify", headers={"origin": origin, "access-control-request-method": "POST"})
                return http.post("/classify", **one(big_png(), f"{i}.png"), headers={"origin": origin})

            with ThreadPoolExecutor(max_workers=16) as pool:
                answers = list(pool.map(send, range(40)))
            preflights, answers = answers[3::4], [a for i, a in enumerate(answers) if i % 4 != 3]
            assert all(p.status_code == 200 and p.headers["access-control-allow-origin"] == origin for p in preflights)
            assert 503 in [a.status_code for a in answers], [a.status_code for a in answers]
            for answer in answers:
                assert answer.headers.get("access-control-allow-origin") == origin, answer.status_code
                if answer.status_code == 503:   # and the browser lets the page's script read Retry-After
                    assert answer.headers["retry-after"] == "1"
                    assert "retry-after" in answer.headers["access-control-expose-headers"].lower()
        finally:
            http.__exit__(None, None, None)


def test_direct_dispatch_keeps_bentomls_request_id_when_tracing_is_on(service, client):
    """With tracing turned back on for the classify paths (the service's docstring says how), an answer, good or
    bad, carries BentoML's X-BentoML-Request-ID both ways (the span id in BentoML's log lines); off by default."""
    from bentoml._internal.configuration.containers import BentoMLContainer
    from opentelemetry.util.http import ExcludeList

    assert "x-bentoml-request-id" not in client.post("/classify", **one(gray_png(60))).headers
    for direct in (1, 0):
        with BentoMLContainer.tracing_excluded_urls.patch(ExcludeList([])):  # tracing.excluded_urls, a cached singleton
            http = in_process(service, TAILWISE_DIRECT=direct)
        try:
            for route, arguments, status in (("/classify", one(gray_png(60)), 200), ("/classify", one(b"junk"), 400),
                                             ("/classify_batch", {"files": [("images", ("a.png", b"x"))]}, 200)):
                response = http.post(route, **arguments)
                assert response.status_code == status, (direct, route, response.text)
                assert len(response.headers.get("x-bentoml-request-id", "")) == 16, (direct, route, response.headers)
        finally:
            http.__exit__(None, None, None)


@pytest.mark.parametrize("content_type", ["image/png", "multipart/form-data; boundary=tailwiseboundary"])
def test_direct_dispatch_client_gone_mid_upload_is_one_warning(client, content_type, caplog):
    """A client that disconnects before its whole body arrived: no answer (nobody reads it; a 500 would count as
    a server error in /metrics), one WARNING line without a traceback (nothing failed in the server), and the
    service goes on. (An ASGI call as uvicorn makes it: the TestClient cannot disconnect mid-body.)"""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/classify", "raw_path": b"/classify", "query_string": b"", "root_path": "",
             "client": ("127.0.0.1", 5000), "server": ("testserver", 80),
             "headers": [(b"content-type", content_type.encode()), (b"content-length", b"100000")]}
    messages, sent = [{"type": "http.request", "body": b"--tailwiseboundary\r\n", "more_body": True}], []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    with caplog.at_level(logging.INFO):
        client.portal.call(client.app, scope, receive, send)
    assert sent == []
    (record,) = client_error_records(caplog.records)
    assert record.levelno == logging.WARNING and record.exc_info is None, record.getMessage()
    assert "POST /classify from 127.0.0.1" in record.getMessage() and "disconnected" in record.getMessage()
    assert_serving(client)


def test_direct_dispatch_server_error_is_a_500_with_the_traceback_logged(service, caplog):
    """A failure inside the handler (here: the model call raising) is a 500 with BentoML's generic message, the
    traceback in the log, and the service still answers the next request once the cause is gone."""
    http = in_process(service, TAILWISE_MAX_UPLOAD_BYTES=MAX_UPLOAD, TAILWISE_BATCHING=0)
    try:
        real = service.OnnxClassifier.predict_arrays
        with pytest.MonkeyPatch.context() as patch, caplog.at_level(logging.ERROR):
            patch.setattr(service.OnnxClassifier, "predict_arrays", lambda self, batch: 1 / 0)
            response = classify(http, {"image": ("a.png", gray_png(100))})
        assert response.status_code == 500 and "unexpected error" in response.json()["error"], response.text
        assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)
        assert service.OnnxClassifier.predict_arrays is real
        assert_serving(http)
    finally:
        http.__exit__(None, None, None)


def client_error_records(records):
    """The log records a request left, but the DEBUG/INFO chatter of libraries."""
    return [r for r in records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_one_warning_and_the_service_goes_on(client, case, caplog):
    route, arguments, status, text = BAD_REQUESTS[case]
    with caplog.at_level(logging.INFO):
        response = client.post(route, **arguments())
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str), body  # one shape for every 4xx
    assert text.lower() in body["error"].lower()
    (record,) = client_error_records(caplog.records)  # one line: no ERROR with a traceback from bentoml
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert f"client error {status} POST {route.split('?')[0]}" in record.getMessage()
    assert body["error"] in record.getMessage()
    assert_serving(client)


# ------------------------------------------------------------------------------------------ load

def test_batcher_merges_queued_jobs_and_survives_errors():
    """Jobs queued while a call runs go together (up to max_images), a larger job runs alone, every job gets
    its own rows back, and a failing call fails only its own jobs."""
    import asyncio
    import threading

    from tailwise.serving.batching import Batcher

    calls, release = [], threading.Event()

    def run(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            release.wait(10)  # hold the first call so that the next jobs queue up
        if (batch == 99).any():
            raise RuntimeError("model failed")
        return batch[:, 0, 0, 0].astype(np.float32) * 2

    async def scenario():
        batcher = Batcher(run, max_images=4)
        first = asyncio.create_task(batcher(np.full((1, 1, 1, 1), 1)))
        await asyncio.sleep(0.05)
        queued = [asyncio.create_task(batcher(np.full((n, 1, 1, 1), v))) for n, v in [(2, 2), (1, 3), (2, 4), (5, 5)]]
        await asyncio.sleep(0.05)
        release.set()
        results = await asyncio.gather(first, *queued)
        failing = await asyncio.gather(batcher(np.full((1, 1, 1, 1), 99)), return_exceptions=True)
        return results, failing, await batcher(np.full((1, 1, 1, 1), 7))

    results, failing, after = asyncio.run(scenario())
    assert calls[:4] == [1, 3, 2, 5]  # [1], then [2 + 1] (4 would overflow), then [2], then the 5 alone
    assert [r.tolist() for r in results] == [[2], [4, 4], [6], [8, 8], [10] * 5]
    assert isinstance(failing[0], RuntimeError) and after.tolist() == [14]


def test_overload_answers_503_with_retry_after_at_once(service, caplog):
    """More concurrent requests than TAILWISE_MAX_IN_FLIGHT (2): each gets a 200 or a 503 with Retry-After and
    the one error shape, none is dropped, refusals leave one summary line, and the service goes on."""
    http = in_process(service, TAILWISE_MAX_IN_FLIGHT=2)
    try:
        def send(i):
            response = classify(http, {"image": (f"{i}.png", big_png())})
            return response.status_code, response.headers.get("retry-after"), response.json()

        with caplog.at_level(logging.INFO), ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(send, range(48)))
        statuses = [status for status, _, _ in answers]
        assert set(statuses) <= {200, 503} and statuses.count(200) >= 2 and 503 in statuses, statuses
        for status, retry_after, body in answers:
            if status == 503:
                assert retry_after == "1" and list(body) == ["error"] and "TAILWISE_MAX_IN_FLIGHT" in body["error"]
        lines = [r.getMessage() for r in client_error_records(caplog.records)]
        assert len(lines) == 1 and "overloaded:" in lines[0] and "refused with 503" in lines[0], lines
        assert_serving(http)
    finally:
        http.__exit__(None, None, None)


def test_draining_closes_connections(client):
    from tailwise.serving.shutdown import drain

    assert "connection" not in client.post("/model_info", json={}).headers
    drain.draining = True
    try:
        assert client.post("/model_info", json={}).headers["connection"] == "close"
        response = classify(client, {"image": ("a.png", b"junk")})
        assert response.status_code == 400 and response.headers["connection"] == "close"
    finally:
        drain.draining = False


@pytest.mark.parametrize("busy_s", [0, 0.3])
def test_sigterm_serves_the_connections_waiting_in_the_backlog(busy_s):
    """A real uvicorn server on a real socket: 24 clients connect and send their request while the event loop is
    busy (so they wait, unaccepted, in the listening socket's backlog), then the drain's SIGTERM handler runs.
    Each of them gets its 200; shutting the listener down alone would reset every one (a listening socket's
    shutdown resets its backlog). A client that connects after the signal is refused. With every loop iteration
    taking `busy_s` (a loaded worker), the drain still waits until uvicorn has the connections, and the shut
    listener is not polled in a loop of errors."""
    import asyncio

    import uvicorn

    from tailwise.serving.shutdown import Drain

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    def answer(client: socket.socket) -> bytes:
        client.settimeout(10)
        data = b""
        try:
            while chunk := client.recv(4096):
                data += chunk
        except OSError as exc:  # a reset: the request was sent and dropped
            return f"dropped: {exc!r}".encode()
        finally:
            client.close()
        return data

    async def main():
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning", timeout_graceful_shutdown=5))
        serving = asyncio.create_task(server.serve(sockets=[listener]))
        while not server.started:
            await asyncio.sleep(0.01)
        loop, errors = asyncio.get_running_loop(), []
        loop.set_exception_handler(lambda _, context: errors.append(context))
        loop.set_default_executor(ThreadPoolExecutor(max_workers=24))   # every client reads at once

        def busy():
            time.sleep(busy_s)
            if not serving.done():
                loop.call_soon(busy)

        waiting = []
        for _ in range(24):  # the loop does not run between these lines: nothing is accepted yet
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
            client.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            waiting.append(client)
        if busy_s:
            loop.call_soon(busy)
        drain = Drain()   # quiet_s 0.5, max_s 5: what the service uses
        drain.handler(loop, listener.fileno(), server.handle_exit)(signal.SIGTERM, None)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        answers = await asyncio.gather(*(asyncio.to_thread(answer, c) for c in waiting))
        await asyncio.wait_for(serving, 20)
        return answers, errors

    raised = []  # uvicorn raises the signal it handled again once it has stopped: here, it is only recorded
    before = signal.signal(signal.SIGTERM, lambda number, frame: raised.append(number))
    try:
        answers, errors = asyncio.run(main())
    finally:
        signal.signal(signal.SIGTERM, before)
    assert [a for a in answers if not (a.startswith(b"HTTP/1.1 200") and a.endswith(b"ok"))] == []
    assert len(errors) < 5, errors[:3]   # not one per loop iteration on the shut listener (thousands)
    assert raised == [signal.SIGTERM]  # the server stopped through uvicorn's own handler

# ------------------------------------------------------------------------------------------ operations

def test_docs_page_is_tailwises_own(client):
    from tailwise import __version__

    page = client.get("/").text
    assert "<title>tailwise: tiny (" in page and "BentoML" not in page
    assert "googletagmanager" not in page and "http" not in page.replace("<!DOCTYPE html>", "")  # no outside URL
    assert client.get("/docs", follow_redirects=False).headers["location"].rstrip("/").endswith("testserver")
    spec = client.get("/docs.json").json()
    assert spec["info"]["title"] == "tailwise: tiny" and spec["info"]["version"] == __version__
    assert "contact" not in spec["info"] and "BentoML" not in spec["info"]["description"]
    for path in ("/classify", "/classify_batch", "/model_info"):
        operation = spec["paths"][path]["post"]
        assert operation["description"].strip(), path
        assert operation["responses"]["400"]["content"]["application/json"]["schema"]["required"] == ["error"]
    body = spec["paths"]["/classify"]["post"]["requestBody"]["content"]
    assert "image" in str(body["multipart/form-data"]) and "image/*" in body
    assert {"503", "415"} <= set(spec["paths"]["/classify"]["post"]["responses"])
    assert not {"503", "415"} & set(spec["paths"]["/model_info"]["post"]["responses"])
    assert client.get("/readyz").status_code == 200


# ------------------------------------------------------------------------------------------ a real server

def start_serve(env, *args, log=None):
    """`tailwise serve ARGS` in its own process (not a new session: stopping it must stop the server)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tailwise", "serve", "--port", str(port), *map(str, args)],
                               cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                               stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process=process)
    except AssertionError:
        stop(process)
        raise
    return process, base


def stop(process, seconds=60):
    """SIGTERM to the process itself (as a supervisor sends it); SIGKILL only if it outlives `seconds`."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            os.killpg(os.getpgid(process.pid), signal.SIGKILL)
            process.wait()
            raise AssertionError(f"tailwise serve did not exit within {seconds} s of SIGTERM") from None


def batch_sizes(url):
    """(model calls, images) so far, from the server's tailwise_batch_size histogram."""
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(("tailwise_batch_size_count", "tailwise_batch_size_sum")):
            values[line.split("{")[0].split(" ")[0]] = float(line.rsplit(" ", 1)[1])
    return values.get("tailwise_batch_size_count", 0), values.get("tailwise_batch_size_sum", 0)


@pytest.mark.slow
def test_a_real_server_batches_a_burst_logs_one_line_per_4xx_and_serves_bentomls_client(server_env, tiny_model_dir,
                                                                                         images, tmp_path):
    """`tailwise serve` with BentoML's metrics on: 256 requests from 64 threads at once, every 8th a bad image
    that gets its own 400 and exactly one WARNING line in the server's log; the others their answer, fewer model
    calls than images (tailwise_batch_size); /readyz, /livez, /metrics; bentoml's own HTTP client."""
    import bentoml

    env = {**server_env, "BENTOML_CONFIG_OPTIONS": "services.TailwiseClassifier.metrics.enabled=true "
                                                   "services.TailwiseClassifier.workers=1"}
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process, base = start_serve(env, "--model", tiny_model_dir, log=log)
    try:
        good = {level: gray_png(level, seed=level) for level in BRIGHTNESS}
        with httpx.Client(base_url=base, timeout=60) as http:
            expected = {level: classify(http, {"image": ("x.png", data)}).json()["predictions"][0]["label"]
                        for level, data in good.items()}

        def send(i):
            level = BRIGHTNESS[i % len(BRIGHTNESS)]
            data = b"broken" if i % 8 == 0 else good[level]
            with httpx.Client(timeout=60) as http:
                response = http.post(f"{base}/classify", files={"image": (f"{i}.png", data)})
            return i, level, response.status_code, response.json()

        with ThreadPoolExecutor(max_workers=64) as pool:
            answers = list(pool.map(send, range(256)))
        for i, level, status, body in answers:
            if i % 8 == 0:
                assert status == 400 and "not an image" in str(body), (i, status, body)
            else:
                assert status == 200 and body["predictions"][0]["label"] == expected[level], (i, status, body)
        calls, batched = batch_sizes(base)
        assert batched > calls, (calls, batched)  # requests were batched: fewer model calls than images
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
        assert "bentoml_service_request_total" in metrics
        assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
        assert httpx.get(f"{base}/livez", timeout=10).status_code == 200
        with bentoml.SyncHTTPClient(base) as bento:  # the typed API, as BentoML's client sends it
            answer = bento.classify(image=images[0], top_k=2)
            assert len(answer["predictions"]) == 2 and answer["provider"] == "CPUExecutionProvider"
            assert isinstance(answer["set"], list) and answer["unsure"] == (len(answer["set"]) != 1)
            for more in ({}, {"top_k": 2}):     # the client sends a body without Content-Type, or urlencoded
                with pytest.raises(bentoml.exceptions.BentoMLException, match="give at least one image"):
                    bento.classify_batch(images=[], **more)
    finally:
        stop(process)
    lines = log_path.read_text().splitlines()
    warnings = [line for line in lines if "client error 400 POST /classify" in line]
    assert len(warnings) == 32 and all("[WARNING]" in line for line in warnings), lines[-40:]
    assert not [line for line in lines if "Traceback" in line or "[ERROR]" in line], lines[-40:]


@pytest.mark.slow
def test_tailwise_serve_starts_the_service_and_sigterm_under_load_drops_nothing(server_env, tiny_model_dir, tmp_path):
    """--model wins over $TAILWISE_MODEL; SIGTERM to `tailwise serve` while 16 clients send requests: every
    request sent gets its 200 (later connections are refused, never reset after sending), the process and its
    children exit, and the port is free."""
    import psutil

    env = {**server_env, "TAILWISE_MODEL": "/nowhere", "TAILWISE_BATCHING": "0",
           "BENTOML_CONFIG_OPTIONS": "services.TailwiseClassifier.metrics.enabled=true"}
    log = open(tmp_path / "server.log", "wb")
    process, base = start_serve(env, "--model", tiny_model_dir, "--shutdown-timeout", "10", log=log)
    children = psutil.Process(process.pid).children(recursive=True)
    try:
        info = httpx.post(f"{base}/model_info", json={}, timeout=10).json()
        assert info["model"] == "tiny" and info["batching"] is False and info["verified"] is True
        assert classify(base, {"image": ("a.png", gray_png(10))}).json()["predictions"][0]["label"] == "ant"
        assert batch_sizes(base) == (1, 1)  # without batching: one model call per request

        outcomes, stop_sending = [], time.monotonic() + 120

        def client(worker):
            with httpx.Client(timeout=60) as http:
                while time.monotonic() < stop_sending:
                    try:
                        response = http.post(f"{base}/classify", files={"image": ("a.png", gray_png(60, seed=worker))})
                    except httpx.ConnectError:  # refused: nothing was sent, the client may go elsewhere
                        outcomes.append("refused")
                        return
                    except httpx.TransportError as exc:  # sent, then dropped: what must not happen
                        outcomes.append(f"dropped: {type(exc).__name__}: {exc}")
                        return
                    outcomes.append(response.status_code)

        with ThreadPoolExecutor(max_workers=16) as pool:
            futures = [pool.submit(client, w) for w in range(16)]
            while outcomes.count(200) < 50:
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            for future in futures:
                future.result()
        process.wait(timeout=60)  # a bound, not a timing claim: the stated limit is --shutdown-timeout + a few s
    finally:
        stop(process)
        log.close()
    assert not [o for o in outcomes if o not in (200, "refused")], (outcomes, (tmp_path / "server.log").read_text())
    assert outcomes.count("refused") == 16  # each client ends when the server is gone
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/readyz", timeout=5)


def test_serve_checks_everything_before_the_server_starts(tiny_model_dir, monkeypatch):
    """serving.server.server_command (what `tailwise serve` runs before exec'ing BentoML), called as a function:
    options named as Python spells them, the default model is the shipped one, the model is passed on."""
    from tailwise import OptionError
    from tailwise.serving.server import server_command

    monkeypatch.delenv("TAILWISE_MODEL", raising=False)
    with pytest.raises(OptionError, match=r"^port= must be 1..65535, got 0$"):
        server_command(tiny_model_dir, port=0)
    with pytest.raises(OptionError, match=r"^keep_alive= must be >= 1"):
        server_command(tiny_model_dir, port=free_port(), keep_alive=0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OptionError, match="pick another port="):
            server_command(tiny_model_dir, port=taken.getsockname()[1])
    argv, env, line = server_command(port=free_port())
    assert env["TAILWISE_MODEL"] == str((REPO / "models" / "fmnist-lt-tailwise" / "model.onnx").resolve())
    assert argv[2:5] == ["bentoml", "serve", "tailwise.serving.service:TailwiseClassifier"] and "10 classes" in line
    argv, env, line = server_command(tiny_model_dir, port=free_port(), verify=False)
    assert env["TAILWISE_MODEL"] == str((tiny_model_dir / "model.onnx").resolve()) and env["TAILWISE_VERIFY"] == "0"


@pytest.mark.slow
def test_tailwise_serve_errors_are_one_line(server_env, tiny_model_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "tailwise", "serve", "--model", str(tiny_model_dir), "--port",
                                 str(port)], cwd=REPO, capture_output=True, text=True, timeout=60,
                                env={**os.environ, **server_env})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (f"tailwise serve: error: cannot listen on 127.0.0.1:{port}: Address already in "
                                     "use (another server is using it: pick another --port)")
    result = subprocess.run([sys.executable, "-m", "tailwise", "serve", "--model", str(tiny_model_dir / "nothing"),
                             "--port", str(free_port())], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "nothing: no such model file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = subprocess.run([sys.executable, "-m", "tailwise", "serve", "--model", str(tiny_model_dir), "--port",
                             str(free_port())], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, **server_env, "TAILWISE_MAX_PIXELS": "abc"})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == "tailwise serve: error: TAILWISE_MAX_PIXELS must be an integer, got 'abc'"


def weights_offset(model_bytes: bytes) -> int:
    """Where the raw bytes of the model's largest initializer (a weight tensor) start in the ONNX file."""
    import onnx

    raw = max((t.raw_data for t in onnx.load_from_string(model_bytes).graph.initializer), key=len)
    assert len(raw) >= 128
    offset = model_bytes.find(raw)
    assert offset > 0
    return offset + len(raw) // 2 - 32


@pytest.mark.slow
def test_serve_and_the_service_refuse_a_tampered_model(server_env, tiny_model_dir, tmp_path):
    """64 bytes flipped in model.onnx: `tailwise serve` and the service module (what a Bento's worker and
    `bentoml build` import) refuse it, naming the file and both hashes; TAILWISE_VERIFY=0 accepts it."""
    import hashlib
    import json

    folder = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_model_dir, folder)
    data = bytearray((folder / "model.onnx").read_bytes())
    start = weights_offset(bytes(data))
    for i in range(64):          # inside the largest weight tensor: still a valid ONNX file, silently wrong weights
        data[start + i] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))
    expected = json.loads((folder / "manifest.json").read_text())["files"]["model.onnx"]["sha256"]
    actual = hashlib.sha256(data).hexdigest()
    result = subprocess.run([sys.executable, "-m", "tailwise", "serve", "--model", str(folder), "--port",
                             str(free_port())], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, **server_env})
    assert result.returncode == 2 and expected in result.stderr and actual in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "model.onnx" in result.stderr
    code = "import tailwise.serving.service"
    env = {**os.environ, **server_env, "TAILWISE_MODEL": str(folder)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode != 0 and expected in result.stderr and actual in result.stderr
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**env, "TAILWISE_VERIFY": "0"})
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_bentoml_build_makes_a_bento_without_torch(server_env, tiny_model_dir, tmp_path):
    source = tmp_path / "src"
    for name in ["bentofile.yaml", "pyproject.toml", "tailwise/__init__.py", "tailwise/_core.py", "tailwise/format.py",
                 "tailwise/conformal.py", *(f"serving/{p.name}" for p in (REPO / "serving").glob("*.py"))]:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / name, source / name)
    (source / "models" / "tiny").mkdir(parents=True)
    for name in ("model.onnx", "card.json", "weights.safetensors", "manifest.json"):
        shutil.copyfile(tiny_model_dir / name, source / "models" / "tiny" / name)
    from test_light_install import BLOCKER

    (tmp_path / "blocker").mkdir()  # `bentoml build` must not need the train extra: torch & co cannot be imported
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, **server_env, "BENTOML_HOME": str(tmp_path / "home"),
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "blocker"), os.environ.get("PYTHONPATH", "")])}
    env.pop("TAILWISE_MODEL")   # a Bento of a user's model, no shipped model: never picked by its modification time
    result = subprocess.run([sys.executable, "-m", "bentoml", "build"], cwd=source, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode != 0 and "set TAILWISE_MODEL" in result.stdout + result.stderr
    env["TAILWISE_MODEL"] = "models/tiny"   # named: relative to the source tree, then to the Bento's src/
    result = subprocess.run([sys.executable, "-m", "bentoml", "build"], cwd=source, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    (bento,) = [p for p in (tmp_path / "home" / "bentos" / "tailwise").iterdir() if p.name != "latest"]
    files = {str(p.relative_to(bento / "src")) for p in (bento / "src").rglob("*") if p.is_file()}
    assert {"serving/service.py", "serving/artifact.py", "serving/integrity.py", "tailwise/__init__.py",
            "tailwise/_core.py", "tailwise/format.py", "tailwise/conformal.py", "models/tiny/model.onnx",
            "models/tiny/manifest.json"} <= files
    # the Bento's own source tree serves: tailwise.serving is its serving/ folder, and no torch comes along
    code = ("import sys; from tailwise.serving import service; assert 'torch' not in sys.modules; "
            "print(service.__file__); print(service.MODEL_PATH.resolve())")
    env.pop("PYTHONPATH", None)
    run = subprocess.run([sys.executable, "-c", code], cwd=bento / "src", capture_output=True, text=True,
                         timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(bento / "src" / "serving" / "service.py"),
                                  str(bento / "src" / "models" / "tiny" / "model.onnx")]
    assert "models/tiny/weights.safetensors" not in files  # serving needs model.onnx only
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime" in requirements and "torch" not in requirements
