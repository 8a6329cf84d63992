"""multipart/form-data parsed in memory with its limits checked while parsing, so a body of 100,000
empty parts or an oversized file is refused at the first part over the limit, not after."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from serving.errors import RequestRejected

MAX_BOUNDARY_CHARS = 70  # RFC 2046
PART_HEADER_MAX_BYTES = 4096
HOW_TO = "let your HTTP client build the multipart body (e.g. curl -F image=@glyph.png)"


@dataclass(frozen=True)
class MultipartPart:
    name: str
    filename: str | None
    data: bytes


@dataclass(frozen=True)
class PartLimits:
    """Parts a body may have, and the bytes each named field may carry (other fields: ``other_bytes``)."""

    max_parts: int
    field_bytes: dict[str, int]
    other_bytes: int
    too_large: Callable[[str, int, int], RequestRejected]  # (field, part index, limit) -> the rejection


class _Collector:
    """python-multipart callbacks that build the parts and refuse the first one over a limit."""

    def __init__(self, limits: PartLimits) -> None:
        self.limits = limits
        self.parts: list[MultipartPart] = []
        self.headers: dict[str, bytes] = {}
        self.field, self.value = bytearray(), bytearray()
        self.chunks: list[bytes] = []
        self.name, self.size, self.limit = "", 0, 0
        self.filename: str | None = None
        self.header_bytes = 0

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": lambda data, start, end: self.on_header_bytes(self.field, data[start:end]),
            "on_header_value": lambda data, start, end: self.on_header_bytes(self.value, data[start:end]),
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_begin(self) -> None:
        if len(self.parts) >= self.limits.max_parts:
            raise RequestRejected(
                413,
                "too_many_parts",
                f"more than {self.limits.max_parts} form parts in one request: send at most the images the "
                "endpoint takes (and top_k once); split them over several requests",
            )
        self.headers.clear()
        self.chunks.clear()
        self.size = self.header_bytes = 0

    def on_header_bytes(self, target: bytearray, data: bytes) -> None:
        self.header_bytes += len(data)
        if self.header_bytes > PART_HEADER_MAX_BYTES:
            raise RequestRejected(
                400, "bad_multipart", f"a part's headers exceed {PART_HEADER_MAX_BYTES} bytes: {HOW_TO}"
            )
        target.extend(data)

    def on_header_end(self) -> None:
        self.headers[self.field.decode("latin-1").lower()] = bytes(self.value)
        self.field.clear()
        self.value.clear()

    def on_headers_finished(self) -> None:
        _, disposition = parse_options_header(self.headers.get("content-disposition", b""))
        filename = disposition.get(b"filename")
        self.name = disposition.get(b"name", b"").decode("utf-8", "replace")
        self.filename = filename.decode("utf-8", "replace") if filename is not None else None
        self.limit = self.limits.field_bytes.get(self.name, self.limits.other_bytes)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.size += end - start
        if self.size > self.limit:
            raise self.limits.too_large(self.name, len(self.parts), self.limit)
        self.chunks.append(data[start:end])

    def on_part_end(self) -> None:
        self.parts.append(MultipartPart(self.name, self.filename, b"".join(self.chunks)))


def parse_multipart(body: bytes, content_type: str, limits: PartLimits) -> list[MultipartPart]:
    """Every part of a multipart/form-data body, parsed in memory (never through temporary files)."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary or len(boundary) > MAX_BOUNDARY_CHARS:
        problem = "without a boundary parameter" if not boundary else f"with a {len(boundary)}-character boundary"
        raise RequestRejected(
            400, "bad_multipart", f"multipart/form-data {problem} (at most {MAX_BOUNDARY_CHARS}): {HOW_TO}"
        )
    collector = _Collector(limits)
    try:
        parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        raise RequestRejected(400, "bad_multipart", f"the multipart body is malformed ({exc}): {HOW_TO}") from None
    if parser.state != MultipartState.END:
        closing = f"--{boundary.decode('latin-1')}--"
        raise RequestRejected(
            400, "bad_multipart", f"the multipart body ends before its closing boundary ({closing}): {HOW_TO}"
        )
    return collector.parts
