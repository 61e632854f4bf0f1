"""`alexnet serve`: the JSON API against real uvicorn servers on loopback ports, checked
against `Classifier` on each image alone and against preprocessing done by hand; bad
uploads; concurrent requests (each gets its own answer, and they shared forward passes);
a bounded load test; the command's exit codes; and the page in a real headless chromium."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import httpx2 as httpx
import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.checkpoint import load_model_file, save_model
from alexnet.cli import UserError, _Parser
from alexnet.dataset import DataStats
from alexnet.images import load_rgb, resize_center_crop
from alexnet.model import build_model
from alexnet.plots import filter_grid
from alexnet.predict import Classifier
from alexnet.serve import MicroBatcher, add_command, create_app, listen

CLASSES = ["cat", "dog", "fish"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("paper", num_classes=3, init="kaiming")
    stats = DataStats(torch.rand(3, 256, 256) * 255, torch.ones(3), torch.eye(3))
    path = tmp_path_factory.mktemp("serve") / "model.safetensors"
    save_model(path, model, CLASSES, stats, {"image_size": 256, "crop": 227, "pixel_scale": 1.0})
    return path


@pytest.fixture(scope="module")
def clf(ckpt):
    return Classifier.load(ckpt, device="cpu")


def image_bytes(w, h, seed, fmt="PNG"):
    """Smooth colour blobs, so different seeds give clearly different predictions."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    buf = io.BytesIO()
    small.resize((w, h), Image.BICUBIC).save(buf, format=fmt)
    return buf.getvalue()


@contextlib.contextmanager
def running(app):
    """`app` under uvicorn in a thread on a free loopback port; yields the base URL."""
    import uvicorn

    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def url(clf):
    with running(create_app(clf, max_upload_bytes=200_000)) as base:
        yield base


def predict(base, data, top=5, name="x.png", client=None):
    files = {"file": (name, data, "image/png")}
    return (client or httpx).post(f"{base}/api/predict", params={"top": top}, files=files, timeout=60)


def alone(clf, data):
    """The oracle: Classifier on this one image, decoded on its own."""
    return clf.probabilities([load_rgb(data)])[0]


def test_info_and_openapi(url):
    info = httpx.get(f"{url}/api/info").json()
    assert info["variant"] == "paper" and info["classes"] == CLASSES and info["num_classes"] == 3
    assert info["preprocessing"] == {"image_size": 256, "crop": 227, "pixel_scale": 1.0,
                                     "mean": "the checkpoint's mean image"}
    assert info["limits"]["max_upload_bytes"] == 200_000
    spec = httpx.get(f"{url}/openapi.json").json()
    assert {"/api/predict", "/api/info", "/api/filters.png", "/api/stats"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/api/predict"]["post"]["requestBody"]["content"]
    assert httpx.get(f"{url}/docs").status_code == 200
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and 'id="file"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing external
    for path, kind in (("/", "text/html"), ("/api/info", "application/json"), ("/api/filters.png", "image/png"),
                       ("/api/stats", "application/json")):  # HEAD too (curl -I, probes): it was 405
        r = httpx.head(f"{url}{path}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and r.content == b"", path


def test_filters_png_is_conv1_in_figure3_layout(url, ckpt):
    r = httpx.get(f"{url}/api/filters.png")
    assert r.headers["content-type"] == "image/png"
    got = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    weights = load_model_file(ckpt).state_dict
    want = filter_grid(weights["features.0.weight"], groups=2)  # paper: conv2 is grouped in two
    assert weights["features.0.weight"].shape == (96, 3, 11, 11)
    np.testing.assert_array_equal(got, want)


def test_predict_matches_classifier_and_hand_crop(url, clf):
    data = image_bytes(300, 200, seed=1, fmt="JPEG")
    r = predict(url, data, name="photo.jpg")
    assert r.status_code == 200, r.text
    body = r.json()
    probs = alone(clf, data)
    order = probs.argsort(descending=True).tolist()
    assert [t["index"] for t in body["top"]] == order  # top=5 capped at 3 classes
    assert [t["class"] for t in body["top"]] == [CLASSES[i] for i in order]
    np.testing.assert_allclose([t["prob"] for t in body["top"]], probs[order].numpy(), rtol=0, atol=1e-5)
    assert (body["width"], body["height"]) == (300, 200)
    prefix = "data:image/png;base64,"
    assert body["crop_png"].startswith(prefix)
    crop = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["crop_png"][len(prefix):]))))
    # by hand: shorter side 200 -> 256 makes 384x256, central square starts at x = 64, and
    # the network's 227x227 patch at 14 inside that
    img = Image.open(io.BytesIO(data)).convert("RGB").resize((384, 256), Image.BILINEAR)
    np.testing.assert_array_equal(crop, np.asarray(img)[14:241, 64 + 14:64 + 241])
    np.testing.assert_array_equal(crop, resize_center_crop(load_rgb(data), 256).transpose(1, 2, 0)[14:241, 14:241])

    top1 = predict(url, data, top=1).json()["top"]
    assert [t["index"] for t in top1] == order[:1]
    assert predict(url, data, top=0).status_code == 422


def truncated_jpeg():
    data = image_bytes(200, 200, seed=2, fmt="JPEG")
    return data[: len(data) // 2]


def bomb_png(w=100_000, h=100_000):
    """A PNG whose header claims w*h pixels (10 gigapixels), a few dozen bytes long."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


@pytest.mark.parametrize("data, status, words", [
    (b"hello, I am a text file", 422, "not an image"),
    (truncated_jpeg(), 422, "truncated"),
    (bomb_png(), 422, "too large"),
    (b"", 422, "empty"),
    (os.urandom(230_000), 413, "too large"),  # over the 200 KB limit, within the multipart allowance
    (os.urandom(400_000), 413, "too large"),  # refused from its Content-Length alone
])
def test_bad_uploads_are_refused_and_serving_goes_on(url, clf, data, status, words):
    r = predict(url, data, name="cat.jpg")  # the name and content type claim a JPEG
    assert r.status_code == status
    detail = r.json()["detail"]
    assert isinstance(detail, str) and words in detail and "\n" not in detail
    good = image_bytes(64, 64, seed=3)
    r = predict(url, good)
    assert r.status_code == 200
    assert r.json()["top"][0]["index"] == int(alone(clf, good).argmax())


def test_a_file_name_as_browsers_send_it_is_shown_as_the_user_named_it(url):
    """Browsers send ", CR and LF in a multipart file name as %22, %0D, %0A; the page then
    showed the name twice, in two spellings."""
    r = predict(url, b"plain text", name="say%22cheese%22.png")
    assert r.status_code == 422 and r.json()["detail"].startswith('say"cheese".png: not an image')


def test_a_chunked_upload_is_cut_off_at_the_limit(url, clf):
    """No Content-Length to refuse it by: the body is counted as it arrives and answered
    413 once it passes the limit, not read (and spooled to disk) to its end first."""
    host, port = url.rsplit("/", 1)[1].split(":")
    head = (b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")
    chunk, total = os.urandom(64 * 1024), 200 * 1024 * 1024  # 200 MB offered, 0.2 MB allowed
    sent, reply = 0, b""
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"POST /api/predict HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
                  f"Content-Type: multipart/form-data; boundary=XyZ\r\n\r\n".encode())
        try:
            for piece in [head] + [chunk] * (total // len(chunk)):
                if select.select([s], [], [], 0)[0]:
                    break  # answered
                s.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < _length(reply):
            data = s.recv(65536)
            if not data:
                break
            reply += data
    status, body = reply.split(b"\r\n", 1)[0], reply.split(b"\r\n\r\n", 1)[1]
    assert b" 413 " in status and "too large" in json.loads(body)["detail"]
    assert sent < total / 10, f"{sent} bytes were taken before the answer"
    good = image_bytes(64, 64, seed=3)
    assert predict(url, good).json()["top"][0]["index"] == int(alone(clf, good).argmax())


def _length(reply: bytes) -> int:
    head = reply.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    return next((int(line.split(":", 1)[1]) for line in head.split("\r\n") if line.startswith("content-length:")),
                1 << 30)


def test_micro_batcher_groups_waiting_items_and_keeps_order():
    entered, gate = threading.Event(), threading.Event()
    calls = []

    def run(items):
        entered.set()
        gate.wait(5)  # the first batch holds the worker while the others queue up
        calls.append(list(items))
        if "bad" in items:
            raise ValueError("bad item")
        return [x * 2 for x in items]

    batcher = MicroBatcher(run, max_batch=4, max_wait_ms=0)
    futures = [batcher.submit(0)]
    assert entered.wait(5)
    futures += [batcher.submit(i) for i in range(1, 7)]
    gate.set()
    assert [f.result(5) for f in futures] == [2 * i for i in range(7)]
    assert calls[0] == [0] and calls[1] == [1, 2, 3, 4] and calls[2] == [5, 6]
    assert batcher.batch_sizes == {1: 1, 4: 1, 2: 1}
    with pytest.raises(ValueError, match="bad item"):
        batcher.submit("bad").result(5)
    assert batcher.submit(10).result(5) == 20  # the worker survived the error
    batcher.close()


def test_concurrent_requests_get_their_own_answers_in_shared_forward_passes(clf):
    n = 8
    images = [image_bytes(80 + 10 * i, 90, seed=10 + i) for i in range(n)]
    with running(create_app(clf, max_batch=8, max_wait_ms=200)) as base:
        barrier, results = threading.Barrier(n), [None] * n

        def client(i):
            with httpx.Client() as c:
                barrier.wait()
                results[i] = predict(base, images[i], top=3, client=c)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stats = httpx.get(f"{base}/api/stats").json()
    for data, r in zip(images, results):
        assert r.status_code == 200, r.text
        got = torch.zeros(3)
        for t in r.json()["top"]:
            got[t["index"]] = t["prob"]
        torch.testing.assert_close(got, alone(clf, data), rtol=0, atol=1e-5)
    assert len({tuple(r.json()["top"][0].values()) for r in results}) > 1  # the images differ
    assert stats["requests"] == n
    assert max(int(k) for k in stats["batch_sizes"]) > 1, stats
    assert stats["forward_passes"] < n


def test_uploads_are_decoded_on_a_bounded_number_of_threads(clf, monkeypatch):
    """However many requests arrive at once, at most `decode_threads` are decoded at the
    same time (they were on the default thread pool: 6 on 2 cores, 20 on 16), so that
    a burst of small 16-bit images cannot take about 0.9 GB each at once."""
    import alexnet.serve as serve_module

    lock, busy, most = threading.Lock(), [0], [0]
    real = serve_module.load_rgb

    def slow_counted(data, max_pixels):
        with lock:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        try:
            time.sleep(0.3)
            return real(data, max_pixels=max_pixels)
        finally:
            with lock:
                busy[0] -= 1

    monkeypatch.setattr(serve_module, "load_rgb", slow_counted)
    n = 6
    with running(create_app(clf, decode_threads=2)) as base:
        assert httpx.get(f"{base}/api/info").json()["decode_threads"] == 2
        barrier, results = threading.Barrier(n), [None] * n

        def client(i):
            with httpx.Client() as c:
                barrier.wait()
                results[i] = predict(base, image_bytes(40, 30, seed=i), top=1, client=c)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert [r.status_code for r in results] == [200] * n
    assert most[0] == 2


def test_load_on_loopback(clf):
    clients, per_client = 6, 8
    images = [image_bytes(64, 48, seed=100 + i) for i in range(clients)]
    with running(create_app(clf)) as base:  # the command's defaults: batches of 8, 5 ms wait
        latencies, errors = [], []

        def client(i):
            with httpx.Client() as c:
                for _ in range(per_client):
                    t0 = time.perf_counter()
                    r = predict(base, images[i], client=c)
                    latencies.append(time.perf_counter() - t0)
                    if r.status_code != 200:
                        errors.append(r.text)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        wall = time.perf_counter() - t0
        stats = httpx.get(f"{base}/api/stats").json()
    assert not errors and len(latencies) == clients * per_client
    p50, p90, p99 = np.percentile(np.array(latencies) * 1000, [50, 90, 99])
    print(f"\nload: {clients} clients x {per_client} requests, {64}x{48} PNG: p50 {p50:.0f} ms, "
          f"p90 {p90:.0f} ms, p99 {p99:.0f} ms, {len(latencies) / wall:.1f} req/s; "
          f"forward passes by batch size {stats['batch_sizes']}")


# --- the command ---------------------------------------------------------------------


def parse(argv):
    parser = _Parser(prog="alexnet")
    add_command(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_command_one_line_errors(ckpt, tmp_path):
    args = parse(["serve", str(tmp_path / "missing.safetensors")])
    with pytest.raises(UserError, match="no checkpoint file") as e:
        args.func(args)
    assert "\n" not in str(e.value)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = parse(["serve", str(ckpt), "--port", str(port)])
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            args.func(args)
    for mb in ("0", "2e6"):  # (2e6 MB: a read past the address space, which failed every upload)
        with pytest.raises(SystemExit) as e:
            parse(["serve", str(ckpt), "--max-upload-mb", mb])
        assert e.value.code == 2
    assert parse(["serve", str(ckpt), "--max-upload-mb", "1048576"]).max_upload_mb == 1 << 20
    # a wait past threading's TIMEOUT_MAX ended the batching thread: every request hung
    with pytest.raises(SystemExit) as e:
        parse(["serve", str(ckpt), "--max-wait-ms", "1e13"])
    assert e.value.code == 2
    assert parse(["serve", str(ckpt), "--max-wait-ms", "60000"]).max_wait_ms == 60000


def test_a_failure_of_the_model_is_a_json_500_of_one_line(ckpt):
    """Out of GPU memory, say: it was Starlette's plain-text 500, which the page could not
    read (it showed a JSON parse error)."""
    clf = Classifier.load(ckpt, device="cpu")

    def broken(images, *args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nsee the documentation")

    clf.probabilities = broken
    with running(create_app(clf)) as base:
        r = predict(base, image_bytes(64, 64, seed=1))
        assert r.status_code == 500
        assert r.json() == {"detail": "the model failed on this image: RuntimeError: CUDA out of memory. "
                                      "Tried to allocate 2.00 GiB"}
        assert httpx.get(f"{base}/api/info", timeout=10).status_code == 200  # serving goes on


SERVE = ("import sys; from alexnet.cli import _Parser; from alexnet.serve import add_command; "
         "p = _Parser(prog='alexnet'); add_command(p.add_subparsers(dest='command')); "
         "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")


@pytest.mark.parametrize("sig, times", [pytest.param(signal.SIGINT, 1, marks=pytest.mark.slow),
                                        (signal.SIGTERM, 1), (signal.SIGTERM, 2)])
def test_command_serves_until_signal_then_exits_0(ckpt, sig, times):
    """Also with an upload stopped half-way: the stop gives it GRACE_S, then cancels it
    without a traceback (SIGTERM waited on it for ever, and a second SIGTERM did nothing);
    a second signal stops at once."""
    from alexnet.serve import GRACE_S

    proc = subprocess.Popen([sys.executable, "-c", SERVE, "serve", str(ckpt), "--port", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, line + proc.stderr.read()
        base = line.split("at ")[1].split("/ ")[0]
        assert httpx.get(f"{base}/api/info", timeout=10).json()["classes"] == CLASSES
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as stalled:
            stalled.sendall(b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                            b"boundary=XyZ\r\nContent-Length: 100000\r\n\r\n--XyZ\r\n")
            time.sleep(0.5)
            t0 = time.monotonic()
            for _ in range(times):
                proc.send_signal(sig)
                time.sleep(0.5)
            out, err = proc.communicate(timeout=GRACE_S + 20)
            took = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "server stopped" in out and err == ""
    assert took < (GRACE_S + 10 if times == 1 else GRACE_S - 1), took


# --- the page in a real browser --------------------------------------------------------


def test_page_in_headless_chromium(url, tmp_path, monkeypatch):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not try to download a browser
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # Chromium's socket folder goes with the test's
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    path = tmp_path / "upload.jpg"
    path.write_bytes(image_bytes(320, 240, seed=7, fmt="JPEG"))
    want = predict(url, path.read_bytes(), top=5).json()

    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    try:
        browser.get(url + "/")
        browser.execute_script("window.realFetch = window.fetch;")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: "3 classes" in b.find_element(By.ID, "info").text)
        browser.find_element(By.ID, "file").send_keys(str(path))
        wait.until(lambda b: b.find_element(By.ID, "top").get_attribute("data-state") in ("done", "error"))
        assert browser.find_element(By.ID, "error").text == ""
        rows = browser.find_elements(By.CSS_SELECTOR, "#top .row")
        names = [r.find_element(By.CLASS_NAME, "name").text for r in rows]
        assert names == [t["class"] for t in want["top"]]
        for row, t in zip(rows, want["top"]):
            bar = row.find_element(By.CLASS_NAME, "bar")
            assert float(bar.get_attribute("data-prob")) == pytest.approx(t["prob"], abs=1e-6)
            track_px = row.find_element(By.CLASS_NAME, "track").size["width"]
            assert bar.size["width"] == pytest.approx(t["prob"] * track_px, abs=1.5)  # drawn to scale
            assert row.find_element(By.CLASS_NAME, "prob").text == f"{100 * t['prob']:.1f}%"
        crop = browser.find_element(By.ID, "crop")
        assert crop.get_attribute("src") == want["crop_png"]
        assert browser.execute_script("return arguments[0].naturalWidth", crop) == 227
        filters = browser.find_element(By.ID, "filters")
        assert browser.execute_script("return arguments[0].naturalWidth", filters) > 0

        bad = tmp_path / "not-an-image.png"
        bad.write_bytes(b"plain text")
        browser.find_element(By.ID, "file").send_keys(str(bad))
        wait.until(lambda b: "not an image" in b.find_element(By.ID, "error").text)
        error = browser.find_element(By.ID, "error").text
        assert error.startswith("not-an-image.png: not an image") and error.count("not-an-image.png") == 1
        # nothing of the previous image is left beside the error
        assert browser.find_elements(By.CSS_SELECTOR, "#top .row") == [] and not crop.is_displayed()
        assert browser.find_element(By.ID, "meta").text == ""

        # an older request answered after a newer one does not replace its answer
        browser.execute_script("""
            const real = window.fetch; let n = 0;
            window.fetch = (...a) => String(a[0]).startsWith("/api/predict") && n++ === 0
              ? new Promise((done) => setTimeout(() => done(real(...a)), 1500)) : real(...a);""")
        slow, fast = tmp_path / "slow.jpg", tmp_path / "fast.jpg"
        slow.write_bytes(image_bytes(200, 200, seed=1, fmt="JPEG"))
        fast.write_bytes(image_bytes(210, 200, seed=2, fmt="JPEG"))
        browser.find_element(By.ID, "file").send_keys(str(slow))
        browser.find_element(By.ID, "file").send_keys(str(fast))
        wait.until(lambda b: b.find_element(By.ID, "meta").text.startswith("fast.jpg"))
        time.sleep(2.5)  # the slow answer has come by now
        assert browser.find_element(By.ID, "meta").text == "fast.jpg: 210x200 pixels"

        # the same file chosen twice in a row is classified twice; a file dropped beside the
        # box is classified, and the page stays (the browser would open the file instead)
        browser.execute_script("""
            const real = window.fetch; window.asked = 0;
            window.fetch = (...a) => { if (String(a[0]).startsWith("/api/predict")) window.asked++;
                                       return real(...a); };""")
        for _ in range(2):
            browser.find_element(By.ID, "file").send_keys(str(fast))
            wait.until(lambda b: b.find_element(By.ID, "top").get_attribute("data-state") == "done")
        assert browser.execute_script("return window.asked") == 2
        prevented = browser.execute_script("""
            const blob = await (await fetch(document.getElementById("crop").src)).blob();
            const dt = new DataTransfer();
            dt.items.add(new File([blob], "dropped.png", {type: "image/png"}));
            const e = new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true});
            document.getElementById("info").dispatchEvent(e);  // (outside the drop box)
            return e.defaultPrevented;""")
        assert prevented
        wait.until(lambda b: b.find_element(By.ID, "meta").text == "dropped.png: 227x227 pixels")
        assert browser.execute_script("return window.asked") == 3  # once: not again by the box

        # an error page that is not JSON (a proxy's, a plain-text 500) is shown as its status
        browser.execute_script("""
            window.fetch = async () => new Response("Internal Server Error",
                                                    {status: 502, statusText: "Bad Gateway"});""")
        browser.find_element(By.ID, "file").send_keys(str(path))
        wait.until(lambda b: b.find_element(By.ID, "top").get_attribute("data-state") == "error")
        assert browser.find_element(By.ID, "error").text == "upload.jpg: 502 Bad Gateway"
        # a server that cannot be reached: fetch's own message, with the file's name (it was
        # "Failed to fetch" alone)
        browser.execute_script("window.fetch = async () => { throw new TypeError('Failed to fetch'); };")
        browser.find_element(By.ID, "file").send_keys(str(fast))
        wait.until(lambda b: b.find_element(By.ID, "top").get_attribute("data-state") == "error")
        assert browser.find_element(By.ID, "error").text == "fast.jpg: server unreachable (Failed to fetch)"
        # a name with a quote, which the browser sends as %22, and one with a literal "%22",
        # which the server reads as a quote: each named once, as the user named it (the
        # second was shown twice, spelled two ways)
        browser.execute_script("window.fetch = window.realFetch;")
        for name, word in (('say "cheese".png', "cheese"), ("100%22 sure.png", "sure")):
            (tmp_path / name).write_bytes(b"plain text")
            browser.find_element(By.ID, "file").send_keys(str(tmp_path / name))
            wait.until(lambda b: name in b.find_element(By.ID, "error").text)
            assert browser.find_element(By.ID, "error").text.startswith(f"{name}: not an image")
            assert browser.find_element(By.ID, "error").text.count(word) == 1
        # a server's error whose text begins with the file's name is not taken for the page's
        # own (it was said to be "server unreachable")
        browser.execute_script("""
            window.fetch = async () => new Response(JSON.stringify({detail: "upload too large: more than 9 bytes"}),
                                                    {status: 413, headers: {"Content-Type": "application/json"}});""")
        named_upload = tmp_path / "upload"
        named_upload.write_bytes(b"0123456789")
        browser.find_element(By.ID, "file").send_keys(str(named_upload))
        wait.until(lambda b: b.find_element(By.ID, "top").get_attribute("data-state") == "error")
        assert browser.find_element(By.ID, "error").text == "upload: upload too large: more than 9 bytes"
    finally:
        browser.quit()


def test_a_request_given_up_does_not_stop_the_batcher():
    """A caller that gives up cancels its future (asyncio.wrap_future does so when the
    awaiting task is cancelled); its item is dropped and later requests are answered."""
    gate, entered = threading.Event(), threading.Event()

    def run(items):
        entered.set()
        gate.wait(5)
        return [x * 2 for x in items]

    batcher = MicroBatcher(run, max_batch=4, max_wait_ms=0)
    first = batcher.submit(1)
    assert entered.wait(5)
    gone, kept = batcher.submit(2), batcher.submit(3)
    assert gone.cancel()  # still queued: cancellable
    gate.set()
    assert first.result(5) == 2 and kept.result(5) == 6
    assert batcher.submit(4).result(5) == 8  # the worker lives on
    assert gone.cancelled() and batcher.batch_sizes == {1: 3}
    batcher.close()
