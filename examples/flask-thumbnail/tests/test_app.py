"""The Flask example over real HTTP against a real `spine up`: a PNG and a JPEG become
thumbnails of the right dimensions, and every error has its own status and says what to do."""

from __future__ import annotations

import io
import socket

import app as example
import httpx
import pytest
from PIL import Image


def picture(width: int, height: int, fmt: str = "PNG") -> bytes:
    """A real picture: left third green, the rest white."""
    img = Image.new("RGB", (width, height), (255, 255, 255))
    img.paste((0, 200, 0), (0, 0, width // 3, height))
    out = io.BytesIO()
    img.save(out, fmt)
    return out.getvalue()


def upload(base: str, data: bytes, name: str = "photo.png", size: str = "60") -> httpx.Response:
    return httpx.post(
        f"{base}/thumbnail",
        files={"image": (name, data, "application/octet-stream")},
        data={"size": size},
        timeout=90,
    )


@pytest.fixture
def base(spine_url, serve) -> str:
    return serve(example.create_app(spine_url))


def test_the_page_has_the_upload_form(base):
    r = httpx.get(f"{base}/")
    assert r.status_code == 200
    assert '<input type="file" name="image"' in r.text
    assert 'enctype="multipart/form-data"' in r.text


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_picture_becomes_a_png_thumbnail(base, fmt):
    r = upload(base, picture(300, 100, fmt), name=f"photo.{fmt.lower()}")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    thumb = Image.open(io.BytesIO(r.content))
    assert thumb.format == "PNG"
    # Fit inside 60×60 with the aspect ratio kept: 300×100 → 60×20.
    assert thumb.size == (60, 20)
    assert r.headers["x-thumbnail-size"] == "60x20"
    assert r.headers["x-spine-job"]
    # The left third is still green, the right end still white.
    rgb = thumb.convert("RGB")
    green, white = rgb.getpixel((5, 10)), rgb.getpixel((55, 10))
    assert green[1] > 150 and green[0] < 80, green
    assert min(white) > 230, white


def test_size_defaults_to_128(base):
    r = upload(base, picture(512, 256), size="")
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(r.content)).size == (128, 64)


def test_no_file_is_400(base):
    r = httpx.post(f"{base}/thumbnail", data={"size": "60"})
    assert r.status_code == 400
    assert "No picture" in r.text and "Choose a PNG or JPEG file" in r.text


def test_a_size_out_of_range_is_400(base):
    r = upload(base, picture(30, 30), size="5000")
    assert r.status_code == 400
    assert "size must be 16 to 1024 pixels, not 5000" in r.text


def test_a_file_that_is_not_a_picture_is_415(base):
    r = upload(base, b"just some text, not an image\n", name="notes.txt")
    assert r.status_code == 415
    assert "notes.txt is not a PNG or JPEG image" in r.text


def test_a_file_too_large_is_413(spine_url, serve):
    base = serve(example.create_app(spine_url, max_upload=256 * 1024))
    r = upload(base, picture(30, 30) + b"\0" * (300 * 1024))
    assert r.status_code == 413
    assert "That file is too large" in r.text
    assert "Pictures up to 262,144 bytes" in r.text


def test_a_picture_the_agent_cannot_decode_names_the_field(base):
    # A PNG signature and then garbage: it passes the app's check, the agent refuses it.
    broken = picture(40, 40)[:60]
    r = upload(base, broken)
    assert r.status_code == 422, r.text
    assert "The picture was refused" in r.text
    assert "field &#x27;input&#x27;" in r.text
    assert r.headers["x-spine-field"] == "input"
    assert "cannot decode the image" in r.text


def test_spine_unreachable_is_503(serve):
    # A loopback port nothing listens on: bound, then closed.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = f"http://127.0.0.1:{port}"
    base = serve(example.create_app(dead))
    r = upload(base, picture(30, 30))
    assert r.status_code == 503
    assert "Spine is unreachable" in r.text
    assert f"No dispatcher answers at {dead}" in r.text
    assert r.headers["retry-after"] == "5"


def test_a_job_still_running_after_the_wait_is_504(spine_url, serve):
    # A wait of a millisecond: a 2000×2000 picture is not thumbnailed in that time.
    base = serve(example.create_app(spine_url, wait=0.001))
    r = upload(base, picture(2000, 2000))
    assert r.status_code == 504, r.text
    assert "The thumbnail is taking too long" in r.text
    assert "it goes on" in r.text
