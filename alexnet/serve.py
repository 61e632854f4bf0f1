"""`alexnet serve`: a web page to try a checkpoint on your own images, and a JSON API.

    alexnet serve runs/RUN/best.safetensors --port 8000

GET /                 the page: drop an image, see the top 5, the crop the network sees,
                      the conv1 filters
POST /api/predict     multipart upload `file`, query `top` -> top classes and the crop
GET /api/info         variant, class names, preprocessing, limits
GET /api/filters.png  conv1 kernels in the paper's Figure 3 layout (`plots.filter_grid`)
GET /api/stats        requests served and the sizes of the forward passes that served them
GET /docs, /openapi.json  the API described by FastAPI

Prediction is `predict.Classifier`, so preprocessing comes from the checkpoint alone.
Uploads are decoded by content (`images.load_rgb`), never by name or content type; the
size in bytes and the pixel count claimed by the header are both limited.

Uploads are decoded on `decode_threads` threads of their own (default 2), so the memory
of decodes in progress is bounded (at most about 0.9 GB each, at the default pixel limit)
whatever the number of cores or of requests at once; others wait their turn. At a stop,
the decodes not yet begun are dropped.

Concurrent requests share forward passes: `MicroBatcher` queues the decoded crops, and
one worker thread takes up to `max_batch` of them (waiting at most `max_wait_ms` for
more after the first), runs one forward pass and hands each request its own row.
"""

import argparse
import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import io
import logging
import queue
import socket
import threading
import time
from importlib import resources
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from alexnet.augment import center_offset
from alexnet.images import MAX_PIXELS, ImageError, load_rgb, resize_center_crop
from alexnet.plots import filter_grid
from alexnet.predict import Classifier

MB = 1 << 20


class MicroBatcher:
    """Runs `run(items) -> results` (one result per item, in order) on one worker thread,
    over as many queued items as are waiting, up to `max_batch`. After the first item of
    a batch it waits up to `max_wait_ms` for more; a lone request pays at most that."""

    def __init__(self, run: Callable[[list], list], max_batch: int = 8, max_wait_ms: float = 5.0):
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait_ms / 1000
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # size -> forward passes
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="alexnet-batcher", daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((item, future))
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _take(self) -> list | None:
        first = self._queue.get()
        if first is None:
            return None
        batch, deadline = [first], time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                nxt = self._queue.get(timeout=max(deadline - time.monotonic(), 1e-6))
            except queue.Empty:
                break
            if nxt is None:
                self._queue.put(None)  # stop after serving this batch
                break
            batch.append(nxt)
        return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            # a request whose caller gave up (its future cancelled) is dropped; setting the
            # result of a cancelled future would raise and end this thread for everyone
            batch = [(item, future) for item, future in batch if future.set_running_or_notify_cancel()]
            if not batch:
                continue
            self.batch_sizes[len(batch)] += 1
            try:
                results = self.run([item for item, _ in batch])
            except Exception as e:  # every request of the batch gets the error, the worker lives on
                for _, future in batch:
                    future.set_exception(e)
                continue
            for (_, future), result in zip(batch, results):
                future.set_result(result)


def _sent_name(filename: str | None) -> str | None:
    """A multipart file name as the user named the file: browsers send `"`, CR and LF as
    %22, %0D and %0A (the HTML standard's form encoding), which a message would show."""
    if not filename:
        return filename
    return filename.replace("%22", '"').replace("%0D", "\r").replace("%0A", "\n")


def png_bytes(image: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 array as PNG file bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def conv1_filters_png(clf: Classifier) -> bytes:
    model = clf.model
    return png_bytes(filter_grid(model.layer("conv1").weight, groups=model.layer("conv2").groups))


class BodyLimit:
    """ASGI middleware: a request to `path` whose body passes `limit` bytes gets 413
    `detail` as soon as it does: from its Content-Length before any of it is read, or,
    for a chunked upload, at the chunk that passes the limit, before the multipart
    parser has spooled more than that to disk."""

    def __init__(self, app, path: str, limit: int, detail: str):
        from starlette.datastructures import Headers
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse

        self.app, self.path, self.limit = app, path, limit
        self._headers, self._refusal = Headers, JSONResponse({"detail": detail}, status_code=413)
        # an HTTPException, so that FastAPI's body parsing hands it on as it is (any
        # other error there becomes a 400) and the app's handler answers it
        self.error = HTTPException(413, detail)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        length = self._headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            return await self._refusal(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise self.error
            return message

        await self.app(scope, counted, send)


def create_app(clf: Classifier, max_upload_bytes: int = 20 * MB, max_batch: int = 8, max_wait_ms: float = 5.0,
               decode_threads: int = 2):
    """The FastAPI application serving `clf`. Its micro-batcher is `app.state.batcher`
    and its decoding threads `app.state.decoder`; they start and stop with the
    application's lifespan. (This module has no `from
    __future__ import annotations`: FastAPI reads the endpoints' annotations, whose types
    are imported here, inside the function.)"""
    from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    from alexnet.checkpoint import CheckpointError

    transform = clf.transforms[False]
    net_crop = transform.crop
    filters = conv1_filters_png(clf)
    page = resources.files("alexnet").joinpath("web/index.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.batcher = MicroBatcher(clf.probabilities, max_batch, max_wait_ms)
        app.state.decoder = concurrent.futures.ThreadPoolExecutor(decode_threads, "alexnet-decode")
        yield
        app.state.decoder.shutdown(wait=False, cancel_futures=True)  # the queued ones: not begun
        app.state.batcher.close()

    app = FastAPI(title="AlexNet", version="0.1.0", lifespan=lifespan,
                  description=f"Classify images with an AlexNet checkpoint ({clf.model.cfg.variant} variant, "
                              f"{clf.num_classes} classes). Uploads up to {max_upload_bytes / MB:g} MB.")

    app.add_middleware(BodyLimit, path="/api/predict", limit=max_upload_bytes + 64 * 1024,  # + multipart framing
                       detail=f"upload too large: more than {max_upload_bytes} bytes")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/api/info", summary="The model: variant, classes, preprocessing, limits")
    async def info() -> dict:
        return {
            "variant": clf.model.cfg.variant,
            "num_classes": clf.num_classes,
            "classes": clf.class_names,
            "preprocessing": {"image_size": clf.image_size, "crop": transform.crop,
                              "pixel_scale": transform.scale, "mean": "the checkpoint's mean image"},
            "limits": {"max_upload_bytes": max_upload_bytes, "max_pixels": clf.max_pixels},
            "batching": {"max_batch": max_batch, "max_wait_ms": max_wait_ms},
            "decode_threads": decode_threads,
        }

    @app.get("/api/filters.png", summary="conv1 kernels as one PNG (paper Figure 3 layout)",
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def filters_png() -> Response:
        return Response(filters, media_type="image/png")

    @app.get("/api/stats", summary="Requests served and the sizes of the forward passes")
    async def stats(request: Request) -> dict:
        sizes = request.app.state.batcher.batch_sizes.copy()
        return {"requests": sum(k * v for k, v in sizes.items()), "forward_passes": sum(sizes.values()),
                "batch_sizes": {str(k): v for k, v in sorted(sizes.items())}}

    # HEAD beside every GET (curl -I, uptime probes, link checkers; FastAPI's get() is GET
    # alone), left out of the schema, where it would repeat the GET's operation
    for path, endpoint, kind in (("/", index, HTMLResponse), ("/api/info", info, JSONResponse),
                                 ("/api/filters.png", filters_png, Response), ("/api/stats", stats, JSONResponse)):
        app.add_api_route(path, endpoint, methods=["HEAD"], response_class=kind, include_in_schema=False)

    def decode(data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
        img = load_rgb(data, max_pixels=clf.max_pixels)
        return resize_center_crop(img, clf.image_size), img.size  # (3, S, S) uint8

    @app.post("/api/predict", summary="Classify one uploaded image",
              responses={413: {"description": "upload larger than the limit"},
                         422: {"description": "not an image, a broken or truncated one, or too many pixels"}})
    async def predict(request: Request, file: UploadFile = File(..., description="an image file, any format "
                                                                                "Pillow reads"),
                      top: int = Query(5, ge=1, le=1000, description="classes to return (capped at the class "
                                                                      "count)")) -> dict:
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload too large: more than {max_upload_bytes} bytes")
        try:
            decoder = request.app.state.decoder
            crop, (w, h) = await asyncio.get_running_loop().run_in_executor(decoder, decode, data)
        except ImageError as e:
            raise HTTPException(422, f"{_sent_name(file.filename) or 'upload'}: {e}") from None
        try:
            probs = await asyncio.wrap_future(request.app.state.batcher.submit(torch.from_numpy(crop)))
        except CheckpointError as e:  # a model whose outputs are not numbers: the server's fault
            raise HTTPException(500, str(e)) from None
        except Exception as e:  # (out of GPU memory, say): a JSON answer the page can show, one line
            raise HTTPException(500, f"the model failed on this image: {type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else ''}") from None
        rows = clf.top(probs[None], top)[0]
        o = center_offset(clf.image_size, net_crop)  # the centre patch the network is given
        seen = crop[:, o:o + net_crop, o:o + net_crop]
        crop_png = await asyncio.to_thread(png_bytes, seen.transpose(1, 2, 0))
        return {"top": [{"class": name, "index": i, "prob": p} for i, name, p in rows],
                "width": w, "height": h,
                "crop_png": "data:image/png;base64," + base64.b64encode(crop_png).decode("ascii")}

    return app


# --- the command ---------------------------------------------------------------------


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket; an address in use is a one-line UserError."""
    from alexnet.cli import UserError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"cannot resolve host {host!r}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _server_class():
    import uvicorn

    from alexnet.distributed import on_stop_signals

    class Server(uvicorn.Server):
        """uvicorn's server, but SIGINT/SIGTERM end it quietly: uvicorn re-raises the
        signal after its graceful shutdown, which would make the exit code 130 or -15."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return

            def stop(sig, frame):
                self.force_exit = self.should_exit  # a second Ctrl-C or SIGTERM: at once
                self.should_exit = True

            with on_stop_signals(stop):
                yield

    return Server


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from alexnet.cli import UserError

    try:
        clf = Classifier.load(args.checkpoint, args.device, args.max_pixels)
    except ValueError as e:  # a CheckpointError, or a device that is not there
        raise UserError(str(e)) from None
    sock = listen(args.host, args.port)
    app = create_app(clf, int(args.max_upload_mb * MB), args.max_batch, args.max_wait_ms, args.decode_threads)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"alexnet: serving {args.checkpoint} at http://{shown}:{port}/ (API docs at /docs); Ctrl-C stops",
          flush=True)
    # a request still in flight (an upload that stopped half-way) is given GRACE_S, then
    # cancelled: the stop never waits on a client
    server = _server_class()(uvicorn.Config(app, log_level="warning", access_log=False,
                                            timeout_graceful_shutdown=GRACE_S))
    logging.getLogger("uvicorn.error").addFilter(_quiet_cancellations)
    server.run(sockets=[sock])
    print("alexnet: server stopped", flush=True)
    return 0


GRACE_S = 5  # seconds the requests in flight have to finish after Ctrl-C or SIGTERM


def _quiet_cancellations(record: logging.LogRecord) -> bool:
    """uvicorn's log without the requests the stop cancelled: its count of them and a
    CancelledError traceback for each, which say nothing wrong happened to the user."""
    if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
        return False
    text = record.getMessage()  # (the lifespan's, cancelled by a second signal, comes as text)
    cancelled = text.startswith("Traceback") and text.rstrip().endswith("CancelledError")
    return not cancelled and "timeout graceful shutdown exceeded" not in text


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0 to 65535, not {v}")
    return v


def _number(text: str, positive: bool) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (v > 0 if positive else v >= 0) or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be {'>' if positive else '>='} 0 and finite, not {text}")
    return v


def _upload_mb(text: str) -> float:
    v = _number(text, positive=True)
    if v > 1 << 20:  # (a read of more than the address space fails every upload)
        raise argparse.ArgumentTypeError(f"must be at most 1048576 (a TiB), not {text}")
    return v


def _wait_ms(text: str) -> float:
    v = _number(text, positive=False)
    if v > 60_000:  # (past threading's TIMEOUT_MAX the batching thread died: every request hung)
        raise argparse.ArgumentTypeError(f"must be at most 60000 (a minute), not {text}")
    return v


def add_command(sub) -> None:
    """Register `alexnet serve` on an argparse subparsers object."""
    from alexnet.cli import _path, _positive_int

    p = sub.add_parser("serve", help="a web page and JSON API to classify your own images",
                       description="Serve a page where you upload or drop an image and see the top 5 classes, "
                                   "the crop the network sees and the conv1 filters; and a JSON API "
                                   "(POST /api/predict, GET /api/info, GET /api/stats, GET /api/filters.png; "
                                   "docs at /docs). "
                                   "Runs until Ctrl-C or SIGTERM (exit 0).")
    p.add_argument("checkpoint", type=_path, help="a .safetensors model file (e.g. RUN/best.safetensors)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine "
                                                       "only; 0.0.0.0 for all)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--device", default="auto", metavar="DEV", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--max-upload-mb", type=_upload_mb, default=20.0, metavar="MB",
                   help="refuse larger uploads with 413 (default 20, in MiB; at most 1048576, a TiB)")
    p.add_argument("--max-pixels", type=_positive_int, default=MAX_PIXELS, metavar="N",
                   help=f"refuse images whose header claims more pixels (default {MAX_PIXELS:,})")
    p.add_argument("--max-batch", type=_positive_int, default=8, metavar="N",
                   help="most concurrent requests in one forward pass (default 8)")
    p.add_argument("--max-wait-ms", type=_wait_ms, default=5.0, metavar="MS",
                   help="how long a forward pass waits for more requests after the first (default 5, "
                        "at most 60000)")
    p.add_argument("--decode-threads", type=_positive_int, default=2, metavar="N",
                   help="uploads decoded at once, each up to about 0.9 GB at the default --max-pixels; "
                        "the others wait (default 2)")
    p.set_defaults(func=_cmd_serve)
