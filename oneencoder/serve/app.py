"""The retrieval explorer: one server-rendered page over a model and its indexes (Starlette).

``GET /`` shows three query forms (text, an uploaded file, SMILES); ``POST /search``
embeds the query once and shows the top k of every index with scores: thumbnails for
images, players for sounds and videos, RDKit depictions for molecules. Files are served
only when an index item names them (``GET /media/{index}/{row}/{field}``), never by path.
A query the model cannot read (a corrupt upload, a wrong SMILES) is a message on the
page with status 400; the server goes on serving.
"""

from __future__ import annotations

import base64
import functools
import io
import logging
import mimetypes
import os
import re
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..api import OneEncoder, load
from ..backbones import require
from ..errors import OneEncoderError
from ..index import VectorIndex, load_index
from ..inputs import modality_of_file
from ..modality import MODALITIES
from ..zeroshot import caption_modality

log = logging.getLogger("oneencoder.serve")

#: Largest upload read (bytes); a bigger one is a message on the page.
MAX_UPLOAD = 50 << 20
_THUMB = 224  # px, longest side of a result thumbnail
_PREVIEW_MAX = 8 << 20  # uploads up to this size are echoed back inline on the results page
_MEDIA_ORDER = {"image": 0, "molecule": 1, "video": 2, "audio": 3}
_MOLECULE = "molecule"  # the modality whose inputs (SMILES) get an RDKit depiction


@dataclass
class Query:
    """One query as the page shows it."""

    modality: str
    shown: str  # text, SMILES or the uploaded file's name
    preview: str | None = None  # data: URI of an uploaded image/sound, or an inline SVG of a molecule


def _file_fields() -> dict[str, str]:
    """Manifest field -> modality, for every registered modality whose inputs are files."""
    out = {}
    for name in MODALITIES.names():
        spec = MODALITIES.get(name).spec
        if spec.reads_files:
            out[spec.record_key] = name
    return out


@functools.lru_cache(maxsize=2048)
def molecule_svg(smiles: str, width: int = 220, height: int = 160) -> str | None:
    """RDKit's 2-D depiction of ``smiles`` as an SVG string (None if RDKit cannot parse it)."""
    from rdkit import Chem, rdBase
    from rdkit.Chem.Draw import rdMolDraw2D

    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return None
    drawer = rdMolDraw2D.MolDraw2DSVG(width, height)
    drawer.drawOptions().clearBackground = False
    rdMolDraw2D.PrepareAndDrawMolecule(drawer, mol)
    drawer.FinishDrawing()
    svg = drawer.GetDrawingText()
    return svg[svg.find("<svg"):]  # without the XML declaration, to inline it in HTML


def thumbnail_png(path: str | Path, side: int = _THUMB) -> bytes:
    """A PNG thumbnail of an image file (SVG through cairosvg), transparency on white."""
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() == ".svg":
        png = require("cairosvg").svg2png(url=str(path), output_width=side * 2)
        img = Image.open(io.BytesIO(png))
    else:
        img = Image.open(path)
    img.load()
    img = img.convert("RGBA")
    canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
    img = Image.alpha_composite(canvas, img).convert("RGB")
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class Explorer:
    """The model, its indexes and the one lock that serialises encoding (torch modules are not re-entrant).

    Args:
        model_dir: Model directory.
        index_dirs: Index directories; each is checked against the model.
        k: Results per index.
        device: Where the model runs.
    """

    def __init__(self, model_dir: str | Path, index_dirs: Sequence[str | Path], k: int = 8,
                 device: str = "auto") -> None:
        if not index_dirs:
            raise OneEncoderError("serve needs at least one --index")
        self.model: OneEncoder = load(model_dir, device=device)
        self.indexes: list[tuple[Path, VectorIndex]] = []
        for path in index_dirs:
            index = load_index(path)
            index.check_model(self.model.meta, model_dir)
            self.indexes.append((Path(path), index))
        self.k = k
        self.fields = _file_fields()
        self._lock = threading.Lock()

    def search(self, modality: str, value: Any, k: int | None = None) -> list[dict[str, Any]]:
        """Embed one query and search every index: one ``{"path", "index", "hits"}`` per index."""
        with self._lock:
            query = self.model.encode(modality, [value], progress=False)
            return [{"no": no, "path": str(path), "index": index, "hits": index.search(query, k or self.k).hits[0]}
                    for no, (path, index) in enumerate(self.indexes)]

    def media(self, no: int, row: int, field: str) -> tuple[str, str]:
        """``(modality, file path)`` of one item's file, or ``OneEncoderError`` if it names none."""
        if not 0 <= no < len(self.indexes):
            raise OneEncoderError(f"no index #{no}")
        index = self.indexes[no][1]
        if not 0 <= row < len(index):
            raise OneEncoderError(f"index #{no} has no row {row}")
        item = index.items[row]
        modality = index.modality if field == "input" else self.fields.get(field)
        value = item.get(field)
        if modality is None or not isinstance(value, str) or not MODALITIES.get(modality).spec.reads_files:
            raise OneEncoderError(f"row {row} of index #{no} has no file in {field!r}")
        return modality, value

    def decorate(self, no: int, hit: dict[str, Any]) -> dict[str, Any]:
        """What the page shows of a hit: its media (``[(kind, url or svg)]``) and a caption."""
        index = self.indexes[no][1]
        media: list[tuple[str, str]] = []
        for field in ["input"] + [f for f in self.fields if f in hit and f != "input"]:
            value = hit.get(field)
            modality = index.modality if field == "input" else self.fields[field]
            if not isinstance(value, str) or (field != "input" and value == hit.get("input")):
                continue
            if modality == _MOLECULE:
                svg = molecule_svg(value)
                if svg:
                    media.append(("molecule", svg))
            elif MODALITIES.get(modality).spec.reads_files:
                media.append((media_kind(value), f"media/{no}/{hit['row']}/{field}"))
        reads_files = MODALITIES.get(index.modality).spec.reads_files
        text = hit.get("caption") or (None if reads_files else hit.get("input"))
        media.sort(key=lambda m: _MEDIA_ORDER.get(m[0], len(_MEDIA_ORDER)))  # pictures above players
        return {**hit, "media": media, "text": text}


def media_kind(path: str) -> str:
    """How the page shows a file, by its MIME type: ``image`` (a thumbnail), ``audio`` or ``video``
    (a player), else ``file`` (a link)."""
    kind = (mimetypes.guess_type(path)[0] or "").split("/")[0]
    return kind if kind in _MEDIA_ORDER else "file"


def _data_uri(data: bytes, filename: str) -> str | None:
    kind = mimetypes.guess_type(filename)[0]
    if not kind or len(data) > _PREVIEW_MAX or not kind.startswith(("image/", "audio/", "video/")):
        return None
    return f"data:{kind};base64," + base64.b64encode(data).decode("ascii")


def _message(e: OneEncoderError, tmp_path: str | None, form: Any) -> str:
    """The error as the page shows it: the upload named by its own file name, no input position."""
    text = re.sub(r"^\w+ input #0: ", "", str(e))
    if tmp_path:
        upload = form.get("file")
        text = text.replace(tmp_path, Path(getattr(upload, "filename", "") or "the upload").name)
    return text


def create_app(model_dir: str | Path, index_dirs: Sequence[str | Path], k: int = 8, device: str = "auto") -> Any:
    """The Starlette application (an ASGI app for uvicorn or any ASGI server)."""
    require("starlette")
    jinja2 = require("jinja2", "Jinja2")
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, PlainTextResponse, Response
    from starlette.routing import Route

    explorer = Explorer(model_dir, index_dirs, k=k, device=device)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parent)),
                             autoescape=jinja2.select_autoescape(["html"]))
    page = env.get_template("page.html")
    file_modalities = [m for m in explorer.model.modalities if MODALITIES.get(m).spec.reads_files]
    try:
        text_modality: str | None = caption_modality(explorer.model)
    except OneEncoderError:
        text_modality = None  # a model without captions: no text box

    def render(status: int = 200, **context: Any) -> HTMLResponse:
        html = page.render(model=explorer.model, indexes=explorer.indexes, k=explorer.k,
                           file_modalities=file_modalities, has_text=text_modality is not None,
                           has_molecule=_MOLECULE in explorer.model.modalities, **context)
        return HTMLResponse(html, status_code=status)

    async def home(request: Request) -> Response:
        return render()

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def search(request: Request) -> Response:
        try:
            form = await request.form(max_files=1, max_fields=16)
        except Exception as e:  # malformed multipart bodies have several exception types
            return render(400, error=f"could not read the form: {e}")
        kind = str(form.get("kind") or "text")
        try:
            k_value = int(form.get("k") or explorer.k)
        except ValueError:
            return render(400, error=f"k must be a whole number, got {form.get('k')!r}")
        k_value = max(1, min(100, k_value))
        tmp_path = None
        try:
            if kind == "text":
                text = str(form.get("text") or "").strip()
                if not text:
                    raise OneEncoderError("type a text query first")
                if text_modality is None:
                    raise OneEncoderError("this model has no text modality")
                query, value = Query(text_modality, text), text
            elif kind == "smiles":
                smiles = str(form.get("smiles") or "").strip()
                if not smiles:
                    raise OneEncoderError("paste a SMILES string first")
                query, value = Query(_MOLECULE, smiles, molecule_svg(smiles)), smiles
            elif kind == "file":
                upload = form.get("file")
                if upload is None or isinstance(upload, str) or not upload.filename:
                    raise OneEncoderError("choose a file to upload first")
                data = await upload.read(MAX_UPLOAD + 1)
                name = Path(upload.filename).name
                if len(data) > MAX_UPLOAD:
                    raise OneEncoderError(f"{name} is larger than {MAX_UPLOAD >> 20} MB")
                if not data:
                    raise OneEncoderError(f"{name} is empty (0 bytes)")
                chosen = str(form.get("as") or "auto")
                modality = (modality_of_file(name, explorer.model.modalities, "choose its modality beside the file")
                            if chosen == "auto" else chosen)
                fd, tmp_path = tempfile.mkstemp(prefix="oneencoder-upload-", suffix=Path(name).suffix.lower())
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                query, value = Query(modality, name, _data_uri(data, name)), tmp_path
            else:
                raise OneEncoderError(f"unknown query kind {kind!r}")
            explorer.model.modality(query.modality)
            results = await run_in_threadpool(explorer.search, query.modality, value, k_value)
        except OneEncoderError as e:
            return render(400, error=_message(e, tmp_path, form), form=dict(form))
        except Exception:  # a bug must not take the page down: log it, say so
            log.exception("query failed")
            return render(500, error="the query failed inside the server; see its log", form=dict(form))
        finally:
            if tmp_path:
                Path(tmp_path).unlink(missing_ok=True)
        shown = [{**r, "hits": [explorer.decorate(r["no"], h) for h in r["hits"]]} for r in results]
        return render(query=query, results=shown, form=dict(form))

    async def media(request: Request) -> Response:
        p = request.path_params
        try:
            _, path = explorer.media(int(p["no"]), int(p["row"]), p["field"])
            if media_kind(path) == "image":
                png = await run_in_threadpool(_cached_thumbnail, path)
                return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})
        except (OneEncoderError, OSError, ValueError) as e:
            return PlainTextResponse(f"not found: {e}", status_code=404)
        except Exception as e:  # an undecodable image (PIL and cairosvg raise many types)
            return PlainTextResponse(f"cannot make a thumbnail: {type(e).__name__}", status_code=404)
        if not Path(path).is_file():
            return PlainTextResponse("not found: the file is gone", status_code=404)
        return FileResponse(path)

    routes = [Route("/", home, methods=["GET"]), Route("/search", search, methods=["POST"]),
              Route("/search", home, methods=["GET"]), Route("/health", health, methods=["GET"]),
              Route("/media/{no:int}/{row:int}/{field:str}", media, methods=["GET"])]
    app = Starlette(routes=routes)
    app.state.explorer = explorer
    return app


@functools.lru_cache(maxsize=4096)
def _cached_thumbnail(path: str) -> bytes:
    return thumbnail_png(path)


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket (port 0: any free one); its port is ``sock.getsockname()[1]``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def server(app: Any, log_level: str = "warning") -> Any:
    """A uvicorn server for ``app``: ``server.run(sockets=[bind(...)])`` serves until ``server.should_exit``."""
    uvicorn = require("uvicorn")
    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False))


def run(app: Any, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``app`` until interrupted, printing the address first."""
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving on http://{shown}:{sock.getsockname()[1]}/  (Ctrl-C stops)", flush=True)
    server(app, log_level="info").run(sockets=[sock])
