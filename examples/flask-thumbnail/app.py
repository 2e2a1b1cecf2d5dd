"""Flask example on a Spine farm: a page where a user uploads a picture; the view hands it to an
``image.thumbnail`` job through the Python client (``spine_client``), waits for the job in the
same request (one round trip to the dispatcher when the job ends within the wait) and answers
with the PNG. Every way this can go wrong gets its own error page with a status a browser and
a script can tell apart: no file, a file too large, a file that is no image, a job an agent
refused (with the API's ``field``), a job that failed otherwise, and Spine unreachable.

The Rust twin is examples/webapp (axum, progress followed by the page); this one is the
shortest path: one view, one call.

    spine up                                    # terminal 1: a local farm on :8480
    python app.py                               # then open http://127.0.0.1:8091
"""

from __future__ import annotations

import argparse
import html
import os
import time

import spine_client
from flask import Flask, Response, request
from werkzeug.exceptions import RequestEntityTooLarge

#: Largest upload accepted, as in examples/webapp: Flask refuses a larger body with 413
#: before the view runs, so it is never read into memory.
MAX_UPLOAD = 20 * 1024 * 1024
#: Thumbnail sizes the form offers; the agent would take up to 16384, a page has no use for it.
SIZES = (16, 1024)
#: How long the view waits for the job (seconds) before answering 504 with the job's id.
WAIT = 60.0

# A PNG starts with its 8-byte signature, a JPEG with SOI and a marker: the image agent takes
# these two, so anything else is refused here without a round trip to the farm.
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"))

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Thumbnails on Spine</title>
<style>body{font:16px system-ui,sans-serif;max-width:40em;margin:2em auto}
.error{border-left:4px solid #c33;padding:.2em 1em;background:#fee}</style></head>
<body><h1>Thumbnails on Spine</h1>
%(error)s
<form method="post" action="/thumbnail" enctype="multipart/form-data">
<p><label>Picture (PNG or JPEG, at most %(max_mib)d MiB):
<input type="file" name="image" accept="image/png,image/jpeg" required></label></p>
<p><label>Size (pixels, %(lo)d to %(hi)d): <input type="number" name="size" value="128"
min="%(lo)d" max="%(hi)d"></label></p>
<p><button>Make a thumbnail</button></p>
</form>
<p>The thumbnail is made by an <code>image.thumbnail</code> job on the farm at
<code>%(api)s</code>.</p>
</body></html>
"""


def image_kind(data: bytes) -> str | None:
    """``"PNG"`` or ``"JPEG"`` from the file's first bytes, ``None`` for anything else."""
    for signature, kind in _SIGNATURES:
        if data.startswith(signature):
            return kind
    return None


def create_app(
    api: str | None = None,
    token: str | None = None,
    *,
    client: spine_client.Client | None = None,
    max_upload: int = MAX_UPLOAD,
    wait: float = WAIT,
) -> Flask:
    """The app, talking to the dispatcher at ``api`` (default ``$SPINE_API`` or
    http://127.0.0.1:8480) with ``token`` (default ``$SPINE_TOKEN``; the browser never sees
    it). ``flask --app app run`` finds this factory too."""
    api = (api or os.environ.get("SPINE_API") or spine_client.DEFAULT_URL).rstrip("/")
    # One client per process: it pools its connections and is safe to share between the
    # threads that serve requests.
    spine = client or spine_client.Client(api, token or os.environ.get("SPINE_TOKEN"))
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = max_upload

    def page(status: int, title: str = "", detail: str = "", **headers: str) -> Response:
        error = ""
        if title:
            error = (
                f'<div class="error"><h2>{html.escape(title)}</h2>'
                f"<p>{html.escape(detail)}</p></div>"
            )
        body = PAGE % {
            "error": error,
            "max_mib": max_upload // (1024 * 1024),
            "lo": SIZES[0],
            "hi": SIZES[1],
            "api": html.escape(api),
        }
        resp = Response(body, status=status, mimetype="text/html")
        resp.headers.update({k.replace("_", "-"): v for k, v in headers.items()})
        return resp

    @app.get("/")
    def index() -> Response:
        return page(200)

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_e: RequestEntityTooLarge) -> Response:
        return page(
            413,
            "That file is too large",
            f"Pictures up to {max_upload:,} bytes are accepted; make it smaller and try again.",
        )

    @app.post("/thumbnail")
    def thumbnail() -> Response:
        upload = request.files.get("image")
        data = upload.read() if upload is not None else b""
        if not data:
            return page(400, "No picture", "Choose a PNG or JPEG file first (form field 'image').")
        size, problem = _size(request.form.get("size"))
        if problem:
            return page(400, "Wrong size", problem)
        kind = image_kind(data)
        if kind is None:
            return page(
                415,
                "That file is not a picture",
                f"{upload.filename or 'The file'} is not a PNG or JPEG image "
                f"(it starts with {data[:8]!r}); choose a .png or .jpg file.",
            )
        started = time.monotonic()
        try:
            job = spine.submit(
                "image.thumbnail",
                {"size": size, "format": "png"},
                input=data,
                input_type=f"image/{kind.lower()}",
                wait=wait,
                deadline="60s",
            )
            png = job.result(timeout=max(0.0, wait - (time.monotonic() - started)))
        except spine_client.JobBadArguments as e:
            # The agent refused the job: the API names the argument at fault (`input` for a
            # picture it cannot decode), which is what the user has to change.
            where = f"field '{e.field}', " if e.field else ""
            headers = {"X_Spine_Field": e.field} if e.field else {}
            return page(
                422, "The picture was refused", f"{e.message} ({where}job {e.job_id}).", **headers
            )
        except spine_client.JobError as e:
            return page(
                502,
                "The thumbnail job did not succeed",
                f"Job {e.job_id} ended {e.job.get('state', e.condition)}: {e.message} "
                f"(condition {e.condition}).",
            )
        except spine_client.WaitTimeout as e:
            return page(
                504,
                "The thumbnail is taking too long",
                f"Job {e.job_id} is still {e.state} after {wait:g} s; it goes on (the page "
                "does not follow it: upload the picture again later).",
            )
        except spine_client.ConnectionFailed:
            return page(
                503,
                "Spine is unreachable",
                f"No dispatcher answers at {api}: start one with `spine up` (or set SPINE_API "
                "to its HTTP API) and try again.",
                Retry_After="5",
            )
        except spine_client.UnknownCapability:
            return page(
                503,
                "No agent makes thumbnails",
                f"The farm at {api} has no agent offering image.thumbnail; `spine up` runs one.",
                Retry_After="5",
            )
        except spine_client.QueueFull as e:
            return page(
                429, "The farm is busy", f"{e.message}; try again shortly.", Retry_After="2"
            )
        except spine_client.TooLarge as e:
            return page(413, "That file is too large for the farm", e.message)
        except spine_client.SpineError as e:
            # The dispatcher refused the request for another reason (a token it does not
            # know, a field it refused): show its words, they name what to fix.
            return page(502, "Spine refused the job", str(e))
        meta = (job.view.get("result") or {}).get("meta") or {}
        return Response(
            png,
            mimetype="image/png",
            headers={
                "Content-Disposition": 'inline; filename="thumbnail.png"',
                "X-Spine-Job": job.id,
                "X-Thumbnail-Size": f"{meta.get('width')}x{meta.get('height')}",
            },
        )

    return app


def _size(raw: str | None) -> tuple[int, str]:
    """The form's ``size``: 128 when absent, else an integer in ``SIZES``; or an error text."""
    if raw is None or raw.strip() == "":
        return 128, ""
    try:
        size = int(raw)
    except ValueError:
        return 0, f"size must be a whole number of pixels, not {raw!r}."
    if not SIZES[0] <= size <= SIZES[1]:
        return 0, f"size must be {SIZES[0]} to {SIZES[1]} pixels, not {size}."
    return size, ""


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Thumbnails of uploaded pictures, made by a Spine farm (see README.md)."
    )
    parser.add_argument("--listen", default="127.0.0.1:8091", help="host:port to serve on")
    parser.add_argument(
        "--api",
        default=None,
        help="the dispatcher's HTTP API (default $SPINE_API or http://127.0.0.1:8480)",
    )
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        parser.error(f"--listen wants host:port (such as 127.0.0.1:8091), not {args.listen!r}")
    create_app(args.api).run(host=host, port=int(port), threaded=True)


if __name__ == "__main__":
    main()
