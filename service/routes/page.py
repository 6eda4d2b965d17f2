"""The clinicians' web page: plain HTML/CSS/JS shipped inside the package, served at ``/`` and ``/static/``.

The page uses the public API only (``/readyz``, ``/predict``, ``/explain``, ``/model``) and ``/page/config``,
which says whether it must ask for an API key. It is never behind a key itself: it holds no data. Every URL
it requests is relative, so it also works under a reverse proxy's path prefix.
"""

from __future__ import annotations

import re
from importlib import resources

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, Field

from service.routes.deps import API_KEY_HEADER, SettingsDep

router = APIRouter(tags=["page"])

STATIC_PACKAGE = "service"
STATIC_FOLDER = "static"
INDEX_FILE = "index.html"
MEDIA_TYPES = {
    "css": "text/css; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "svg": "image/svg+xml",
}
# Flat names only (no folders, no dots but the suffix): nothing outside the static folder can be named.
_ASSET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*\.(css|js|svg)")
# Same-origin everything; images only as blobs the page decodes itself; no inline script or style.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate, so an upgraded service never runs yesterday's script
}


class PageConfig(BaseModel):
    """What the web page needs to know before its first API call."""

    api_key_required: bool = Field(description="Whether /predict, /explain and /model need an API key.")
    api_key_header: str = Field(description="The header that carries the key.")
    max_upload_bytes: int = Field(description="Largest accepted file, in bytes.")


def static_file(name: str) -> bytes:
    """Bytes of one file of the page (package data, so it works from a wheel as well as a checkout)."""
    return resources.files(STATIC_PACKAGE).joinpath(STATIC_FOLDER, name).read_bytes()


@router.get("/", include_in_schema=False)
async def index() -> Response:
    """The web page."""
    return Response(static_file(INDEX_FILE), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/static/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    """A stylesheet, script or icon of the web page."""
    match = _ASSET_NAME.fullmatch(name)
    if match is None:
        raise HTTPException(404, "No such file.")
    try:
        content = static_file(name)
    except FileNotFoundError:
        raise HTTPException(404, "No such file.") from None
    return Response(content, media_type=MEDIA_TYPES[match.group(1)], headers=PAGE_HEADERS)


@router.get("/page/config")
async def page_config(settings: SettingsDep) -> PageConfig:
    """What the web page needs to know first: whether to ask for an API key, and the upload limit."""
    return PageConfig(
        api_key_required=bool(settings.api_keys),
        api_key_header=API_KEY_HEADER,
        max_upload_bytes=settings.max_upload_bytes,
    )
