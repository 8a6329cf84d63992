"""Test images and a corpus of bad requests for the service.

``draw(char, ...)`` renders a handwritten-like character with the project's Japanese font as an image
file in any mode/format (a scan: dark ink on white; a dataset-like glyph: white on black; transparent
backgrounds; 16-bit; CMYK). ``BAD_REQUESTS`` lists requests the service must answer with a 4xx JSON
error naming the problem; ``ODD_BUT_VALID`` lists unusual images it must classify.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.figures import japanese_font_path


def ink(char: str, side: int = 112, font_frac: float = 0.8) -> np.ndarray:
    """White-on-black float ink (0..255) of ``char`` centred on a ``side`` square."""
    canvas = Image.new("L", (side, side), 0)
    font = ImageFont.truetype(str(japanese_font_path()), int(side * font_frac))
    ImageDraw.Draw(canvas).text((side / 2, side / 2), char, fill=255, font=font, anchor="mm", stroke_width=1,
                                stroke_fill=255)
    return np.asarray(canvas, dtype=np.float32)


def encode(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def scan_png(char: str, side: int = 112) -> bytes:
    """Dark ink on white paper, like a scan or a drawing app export."""
    return encode(Image.fromarray((255 - ink(char, side)).astype(np.uint8)))


def rgba_transparent(char: str, color: tuple[int, int, int], side: int = 112) -> bytes:
    """Strokes of ``color`` on a fully transparent canvas."""
    alpha = ink(char, side).astype(np.uint8)
    rgba = np.zeros((side, side, 4), dtype=np.uint8)
    rgba[..., :3] = color
    rgba[..., 3] = alpha
    return encode(Image.fromarray(rgba, "RGBA"))


def png16(char: str, side: int = 112) -> bytes:
    """16-bit grayscale PNG, dark ink on white."""
    values = ((255 - ink(char, side)) * 257).astype(np.uint16)
    return encode(Image.fromarray(values))


def cmyk_jpeg(char: str, side: int = 112) -> bytes:
    """CMYK JPEG (print workflows): black ink is K=255 on white paper (K=0)."""
    cmyk = np.zeros((side, side, 4), dtype=np.uint8)
    cmyk[..., 3] = ink(char, side).astype(np.uint8)
    return encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95)


def animated_gif(first: str, second: str, side: int = 112) -> bytes:
    """Two-frame GIF: the service classifies the first frame."""
    frames = [Image.fromarray((255 - ink(char, side)).astype(np.uint8)).convert("P") for char in (first, second)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated_jpeg(char: str, side: int = 112) -> bytes:
    """JPEG stored rotated 90 degrees with EXIF orientation 6 (a phone photo): upright once transposed."""
    upright = Image.fromarray((255 - ink(char, side)).astype(np.uint8))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 = rotate 270 (cw 90) to view
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def huge_png(width: int = 10_000, height: int = 5_000) -> bytes:
    """A 50-megapixel 1-bit PNG of a few hundred kilobytes: a decompression bomb for a pixel limit."""
    return encode(Image.new("1", (width, height), 1), optimize=True)


def zero_size_png() -> bytes:
    """A syntactically valid PNG header declaring a 0x0 image (Pillow cannot write one)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 0, 0, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@dataclass(frozen=True)
class BadRequest:
    """One bad request: how to send it and a phrase the error message must contain."""

    name: str
    endpoint: str
    expect_status: int
    expect_phrase: str
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    data: dict[str, str] | None = None
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def send(self, client: Any) -> Any:
        return client.post(f"/{self.endpoint}", files=self.files, data=self.data, json=self.json,
                           content=self.content, headers=self.headers)


def bad_requests(valid_png: bytes, max_upload_bytes: int, max_batch_images: int,
                 max_request_bytes: int) -> list[BadRequest]:
    """The corpus; ``valid_png`` is a good image used where only another part of the request is wrong."""
    truncated = valid_png[: len(valid_png) // 2]
    one = lambda payload, name="x.png", ctype="image/png": [("image", (name, payload, ctype))]  # noqa: E731
    over_file_limit = b"\x89PNG\r\n\x1a\n" + b"\0" * max_upload_bytes  # body within limits, file over
    over_body_limit = b"\0" * (2 * max_upload_bytes)  # refused while reading the body
    # Each file within the per-image limit and few enough files, but the whole body above serve.max_request_bytes.
    per_file = max_upload_bytes - 1024
    over_request_limit = [("images", (f"{i}.png", b"\0" * per_file, "image/png"))
                          for i in range(max_request_bytes // per_file + 1)]
    assert len(over_request_limit) <= max_batch_images, "the test's limits must make the body cap bind first"
    return [
        BadRequest("empty file", "predict", 422, "empty", files=one(b"")),
        BadRequest("not an image", "predict", 422, "not an image", files=one(b"hello, this is text\n" * 10)),
        BadRequest("truncated png", "predict", 422, "truncated", files=one(truncated)),
        BadRequest("zero-size png", "predict", 422, "0x0", files=one(zero_size_png())),
        BadRequest("50-megapixel png", "predict", 422, "pixels", files=one(huge_png())),
        BadRequest("pdf", "predict", 422, "not an image", files=one(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n")),
        BadRequest("eps (external program)", "predict", 422, "not an image",
                   files=one(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")),
        BadRequest("blank white image", "predict", 422, "no visible strokes",
                   files=one(encode(Image.new("L", (64, 64), 255)))),
        BadRequest("fully transparent", "predict", 422, "transparent",
                   files=one(encode(Image.new("RGBA", (64, 64), (0, 0, 0, 0))))),
        BadRequest("huge upload", "predict", 413, "limit", files=one(over_body_limit)),
        BadRequest("file over the per-image limit", "predict", 422, "above the limit", files=one(over_file_limit)),
        BadRequest("missing image field", "predict", 422, "exactly one image",
                   content=b"--b\r\nContent-Disposition: form-data; name=\"top_k\"\r\n\r\n3\r\n--b--\r\n",
                   headers={"content-type": "multipart/form-data; boundary=b"}),
        BadRequest("unknown field only", "predict", 400, "unexpected form field",
                   files=[("picture", ("x.png", valid_png, "image/png"))]),
        BadRequest("two images on predict", "predict", 422, "exactly one image",
                   files=[("image", ("a.png", valid_png, "image/png")), ("image", ("b.png", valid_png, "image/png"))]),
        BadRequest("wrong content type", "predict", 415, "not accepted", content=valid_png,
                   headers={"content-type": "image/png"}),
        BadRequest("no content type", "predict", 415, "not accepted", content=b"raw"),
        BadRequest("json with the wrong key", "predict", 400, "image_base64", json={"image": "abc"}),
        BadRequest("multipart without boundary", "predict", 400, "boundary", content=b"--x\r\n",
                   headers={"content-type": "multipart/form-data"}),
        BadRequest("malformed multipart", "predict", 400, "malformed", content=b"garbage without any boundary",
                   headers={"content-type": "multipart/form-data; boundary=abc"}),
        BadRequest("top_k zero", "predict", 422, "top_k", files=one(valid_png), data={"top_k": "0"}),
        BadRequest("top_k too large", "predict", 422, "top_k", files=one(valid_png), data={"top_k": "1000"}),
        BadRequest("top_k not a number", "predict", 422, "whole number", files=one(valid_png),
                   data={"top_k": "five"}),
        BadRequest("too many images", "predict_batch", 413, "split them",
                   files=[("images", (f"{i}.png", valid_png, "image/png")) for i in range(max_batch_images + 1)]),
        BadRequest("batch body over the request limit", "predict_batch", 413, "limit",
                   files=over_request_limit),
        BadRequest("no images in batch", "predict_batch", 422, "no images",
                   content=b"--b\r\nContent-Disposition: form-data; name=\"top_k\"\r\n\r\n2\r\n--b--\r\n",
                   headers={"content-type": "multipart/form-data; boundary=b"}),
        BadRequest("one bad image in batch", "predict_batch", 422, "image 1",
                   files=[("images", ("ok.png", valid_png, "image/png")), ("images", ("bad.png", b"nope", "image/png"))]),
        BadRequest("invalid base64", "predict_batch", 422, "not valid base64",
                   json={"images_base64": ["this is not base64!!"]}),
        BadRequest("base64 of text", "predict_batch", 422, "not an image",
                   json={"images_base64": [base64.b64encode(b"just text").decode()]}),
        BadRequest("invalid json", "predict_batch", 400, "not valid JSON", content=b"{not json",
                   headers={"content-type": "application/json"}),
        BadRequest("json wrong shape", "predict_batch", 400, "images_base64", json=["a", "b"]),
        BadRequest("json images not a list of strings", "predict_batch", 422, "list of base64", json={"images_base64": [1, 2]}),
    ]


ODD_BUT_VALID: dict[str, Callable[[str], bytes]] = {
    "16-bit png": png16,
    "cmyk jpeg": cmyk_jpeg,
    "rgba black strokes on transparent": lambda char: rgba_transparent(char, (0, 0, 0)),
    "rgba white strokes on transparent": lambda char: rgba_transparent(char, (255, 255, 255)),
    "animated gif (first frame)": lambda char: animated_gif(char, "ん" if char != "ん" else "あ"),
    "exif-rotated jpeg": exif_rotated_jpeg,
    "palette png": lambda char: encode(Image.open(io.BytesIO(scan_png(char))).convert("P")),
    "1-bit png": lambda char: encode(Image.open(io.BytesIO(scan_png(char))).convert("1")),
    "grayscale+alpha png": lambda char: encode(Image.open(io.BytesIO(rgba_transparent(char, (0, 0, 0)))).convert("LA")),
    "rgb jpeg": lambda char: encode(Image.open(io.BytesIO(scan_png(char))).convert("RGB"), "JPEG", quality=90),
    "webp": lambda char: encode(Image.open(io.BytesIO(scan_png(char))).convert("RGB"), "WEBP", quality=90),
    "bmp": lambda char: encode(Image.open(io.BytesIO(scan_png(char))), "BMP"),
    "tiff": lambda char: encode(Image.open(io.BytesIO(scan_png(char))), "TIFF"),
}


# ----------------------------------------------- hostile but legitimate clients (issue 20)
def multipart_raw(parts: list[tuple[str, str | None, bytes]], boundary: str = "b", close: bool = True) -> bytes:
    """A multipart body built by hand (``close=False``: without its closing boundary)."""
    chunks = []
    for name, filename, data in parts:
        file_part = f'; filename="{filename}"' if filename is not None else ""
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{file_part}\r\n\r\n'.encode()
                      + data + b"\r\n")
    return b"".join(chunks) + (f"--{boundary}--\r\n".encode() if close else b"")


def hostile_requests(valid_png: bytes, max_pixels_per_request: int) -> list[BadRequest]:
    """Small requests that once cost seconds or hung the server; each must be a 4xx JSON at once."""
    form = {"content-type": "multipart/form-data; boundary=b"}
    as_json = {"content-type": "application/json"}
    encoded = base64.b64encode(valid_png).decode()
    side = int((max_pixels_per_request // 2) ** 0.5) + 1  # two such images pass the per-request pixel cap
    big = huge_png(side, side)
    return [
        BadRequest("json nested 100,000 deep", "predict_batch", 400, "nested", content=b"[" * 100_000,
                   headers=as_json),
        BadRequest("json objects nested 50,000 deep", "predict_batch", 400, "nested",
                   content=b'{"images_base64":' * 50_000, headers=as_json),
        BadRequest("top_k Infinity", "predict_batch", 422, "whole number",
                   content=f'{{"images_base64": ["{encoded}"], "top_k": Infinity}}'.encode(), headers=as_json),
        BadRequest("top_k 1e400", "predict_batch", 422, "whole number",
                   content=f'{{"images_base64": ["{encoded}"], "top_k": 1e400}}'.encode(), headers=as_json),
        BadRequest("top_k of 5,000 digits (json)", "predict_batch", 400, "not valid JSON",
                   content=f'{{"images_base64": ["{encoded}"], "top_k": {"9" * 5000}}}'.encode(),
                   headers=as_json),
        BadRequest("top_k of 5,000 digits (form)", "predict", 422, "top_k",
                   content=multipart_raw([("image", "a.png", valid_png), ("top_k", None, b"9" * 5000)]),
                   headers=form),
        BadRequest("top_k sent twice", "predict", 422, "once",
                   content=multipart_raw([("image", "a.png", valid_png), ("top_k", None, b"2"),
                                          ("top_k", None, b"3")]), headers=form),
        BadRequest("boundary of 300 characters", "predict", 400, "boundary",
                   content=multipart_raw([("image", "a.png", valid_png)], "x" * 300),
                   headers={"content-type": "multipart/form-data; boundary=" + "x" * 300}),
        BadRequest("unterminated multipart", "predict", 400, "closing boundary",
                   content=multipart_raw([("image", "a.png", valid_png)], close=False), headers=form),
        BadRequest("40,000 empty parts", "predict_batch", 413, "form parts",
                   content=multipart_raw([("images", "e.png", b"")] * 40_000), headers=form),
        BadRequest("pixels per request", "predict_batch", 413, "pixels",
                   content=multipart_raw([("images", "a.png", big), ("images", "b.png", big)]), headers=form),
        BadRequest("blank 28x28 white", "predict", 422, "no visible strokes",
                   content=multipart_raw([("image", "w.png", encode(Image.new("L", (28, 28), 255)))]), headers=form),
        BadRequest("blank 28x28 black", "predict", 422, "no visible strokes",
                   content=multipart_raw([("image", "k.png", encode(Image.new("L", (28, 28), 0)))]), headers=form),
    ]


def raw_http(port: int, data: bytes, timeout_s: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` as is on a fresh connection and read the answer (raises on a timeout: a hang)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return status, headers, body
