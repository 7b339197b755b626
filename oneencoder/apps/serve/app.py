"""The retrieval explorer: one server-rendered page over a model and its indexes (Starlette).

``GET /`` shows three query forms (text, an uploaded file, SMILES); ``POST /search``
embeds the query once and shows the top k of every index with scores: thumbnails for
images, players for sounds and videos, RDKit depictions for molecules. Files are served
only when they are the indexed inputs of a file modality (``GET /media/{index}/{row}/input``),
never by a path or another field of the item. A query the model cannot read (a corrupt
upload, a wrong SMILES) is a message on the page with status 400; one over a limit gets a
4xx naming the limit; the server goes on serving.

The event loop never runs native work: decoding and featurising the query, RDKit
drawings and thumbnails run in a few worker processes (:mod:`.workers`) with a time limit
per job, so a hostile input that hangs or crashes its worker fails alone while ``/health``
and every other request are answered; the model's forward pass runs in a thread.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import logging
import mimetypes
import os
import pickle
import re
import socket
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ...deps import require
from ...errors import OneEncoderError, SampleError
from ...features.inputs import modality_of_file
from ...modality import MODALITIES
from ..api import OneEncoder, load
from ..index import VectorIndex, load_index
from ..zeroshot import caption_modality
from .workers import WorkerError, WorkerPool

log = logging.getLogger("oneencoder.apps.serve")

#: Largest upload read (bytes); a bigger one is a message on the page (413).
MAX_UPLOAD = 50 << 20
#: Largest request body (bytes): an upload plus room for the form's other fields; more is a 413.
MAX_BODY = MAX_UPLOAD + (1 << 20)
#: Longest text or SMILES query (characters); a longer one is a 400 before any work.
MAX_QUERY_CHARS = 10_000
#: SMILES drawn with RDKit only up to this length and atom count (drawing time grows
#: quadratically: 5,000 atoms drew for over 100 s); a larger molecule is shown without a picture.
MAX_DRAW_CHARS = 1_000
MAX_DRAW_ATOMS = 250
#: Images thumbnailed only up to this many pixels (as the image modality's own limit).
MAX_THUMB_PIXELS = 8192 * 8192
#: Default seconds one query's decoding, featurising or one drawing may take in a worker.
QUERY_TIMEOUT = 30.0
#: Default worker processes for that work (queries decoded at once).
WORKERS = 2
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
    """RDKit's 2-D depiction of ``smiles`` as an SVG string.

    None if RDKit cannot parse it, or if it is over :data:`MAX_DRAW_CHARS` characters or
    :data:`MAX_DRAW_ATOMS` atoms: drawing grows much faster than the molecule, so this cap
    holds here whatever the molecule modality accepts. The server runs this in a worker.
    """
    from rdkit import Chem, rdBase
    from rdkit.Chem.Draw import rdMolDraw2D

    if not isinstance(smiles, str) or len(smiles) > MAX_DRAW_CHARS:
        return None
    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(smiles)
    if mol is None or mol.GetNumAtoms() > MAX_DRAW_ATOMS:
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
    if img.width * img.height > MAX_THUMB_PIXELS:  # from the header, before decoding
        raise SampleError(f"{img.width}x{img.height} image is over the limit of {MAX_THUMB_PIXELS:,} pixels")
    img.load()
    img = img.convert("RGBA")
    canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
    img = Image.alpha_composite(canvas, img).convert("RGB")
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ----- what the worker processes run --------------------------------------------------------

_WORKER_MODALITIES: dict[str, Any] = {}


def _init_worker(modalities: dict[str, tuple[str, Any]]) -> None:
    """A worker's setup: the model's modalities, sent pickled (or rebuilt from their record)."""
    from ...model.checkpoint import modality_from_meta

    torch.set_num_threads(1)  # a few workers share the CPUs with the model's forward pass
    for name, (how, value) in modalities.items():
        _WORKER_MODALITIES[name] = pickle.loads(value) if how == "pickle" else modality_from_meta(
            name, value, check_weights=False)


def _prepare_job(modality: str, value: Any) -> Any:
    """Decode and featurise one query (the modality's ``prepare``): what may hang or crash."""
    try:
        return _WORKER_MODALITIES[modality].prepare(value)[1]
    except OneEncoderError:
        raise
    except Exception as e:  # noqa: BLE001 - a decoder's own error type is still this input's problem
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise SampleError(f"cannot read it ({type(e).__name__}{': ' + first if first else ''})") from None


# ----- the explorer -------------------------------------------------------------------------


class _Memo:
    """A small least-recently-used cache of job results, shared by the server's threads."""

    def __init__(self, size: int) -> None:
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._size, self._lock = size, threading.Lock()

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        value = make()
        with self._lock:
            self._data[key] = value
            while len(self._data) > self._size:
                self._data.popitem(last=False)
        return value


class Explorer:
    """The model, its indexes, the worker processes, and the one lock that serialises
    encoding (torch modules are not re-entrant).

    Args:
        model_dir: Model directory.
        index_dirs: Index directories; each is checked against the model.
        k: Results per index.
        device: Where the model runs.
        workers: Processes that decode queries and draw (see :mod:`.workers`).
        timeout: Seconds one query's decoding (or one drawing, one thumbnail) may take.
    """

    def __init__(self, model_dir: str | Path, index_dirs: Sequence[str | Path], k: int = 8,
                 device: str = "auto", workers: int = WORKERS, timeout: float = QUERY_TIMEOUT) -> None:
        if not index_dirs:
            raise OneEncoderError("serve needs at least one --index")
        if not timeout > 0:
            raise OneEncoderError(f"timeout must be a positive number of seconds, got {timeout}")
        self.model: OneEncoder = load(model_dir, device=device)
        self.indexes: list[tuple[Path, VectorIndex]] = []
        for path in index_dirs:
            index = load_index(path)
            index.check_model(self.model.meta, model_dir)
            self.indexes.append((Path(path), index))
        self.k, self.timeout = k, float(timeout)
        self._lock = threading.Lock()
        self._drawings, self._thumbnails = _Memo(2048), _Memo(1024)
        self.pool = WorkerPool(workers, init=_init_worker, init_args=(self._worker_modalities(),))

    def _worker_modalities(self) -> dict[str, tuple[str, Any]]:
        """Each modality as the workers receive it: pickled, or its record if it does not pickle."""
        out: dict[str, tuple[str, Any]] = {}
        for name in self.model.modalities:
            try:
                modality = self.model.modality(name)
            except OneEncoderError as e:  # e.g. its backbone is not installed: its queries say so
                log.warning("the %s modality cannot be used: %s", name, e)
                continue
            try:
                out[name] = ("pickle", pickle.dumps(modality))
            except Exception:  # noqa: BLE001 - a plugin's modality may hold an unpicklable handle
                out[name] = ("meta", self.model.meta["modalities"][name])
        return out

    def close(self) -> None:
        """Stop the worker processes."""
        self.pool.close()

    def embed(self, modality: str, value: Any) -> torch.Tensor:
        """``[1, d]`` embedding of one query: decoded in a worker, then the model's forward pass here.

        The same steps as :meth:`OneEncoder.encode` (``prepare``, ``featurize``, the model), so
        the scores equal the library's.

        Raises:
            SampleError: the input cannot be read. WorkerError: it ran past the time limit or crashed its worker.
        """
        m = self.model.modality(modality)
        item = self.pool.call(_prepare_job, modality, value, timeout=self.timeout)
        with self._lock, torch.no_grad():
            tokens, mask = m.featurize(self.model._backbone(modality), [item])
            return self.model.encode_features(modality, tokens, mask)

    def search(self, modality: str, value: Any, k: int | None = None) -> list[dict[str, Any]]:
        """Embed one query and search every index: one ``{"no", "path", "index", "hits"}`` per index."""
        query = self.embed(modality, value)
        return [{"no": no, "path": str(path), "index": index, "hits": index.search(query, k or self.k).hits[0]}
                for no, (path, index) in enumerate(self.indexes)]

    def drawing(self, smiles: str) -> str | None:
        """RDKit's SVG of ``smiles``, drawn in a worker (None: unparsable, too large, too slow, crashed)."""
        def draw() -> str | None:
            try:
                return self.pool.call(molecule_svg, smiles, timeout=self.timeout)
            except (OneEncoderError, RuntimeError) as e:  # the page shows the molecule without a picture
                log.warning("no drawing of a %d-character SMILES: %s", len(smiles), e)
                return None

        if not isinstance(smiles, str) or len(smiles) > MAX_DRAW_CHARS:
            return None  # not even sent to a worker
        return self._drawings.get(smiles, draw)

    def thumbnail(self, path: str) -> bytes:
        """A PNG thumbnail of an indexed image file, made in a worker (cached)."""
        return self._thumbnails.get(path, lambda: self.pool.call(thumbnail_png, path, timeout=self.timeout))

    def media(self, no: int, row: int, field: str) -> tuple[str, str]:
        """``(modality, file path)`` of one indexed input, or ``OneEncoderError``.

        Only the indexed inputs of a file modality are served (``field`` is ``"input"``):
        another field of the item may name any file, e.g. ``/etc/hostname``.
        """
        if not 0 <= no < len(self.indexes):
            raise OneEncoderError(f"no index #{no}")
        index = self.indexes[no][1]
        if not 0 <= row < len(index):
            raise OneEncoderError(f"index #{no} has no row {row}")
        value = index.items[row].get("input")
        if field != "input" or not MODALITIES.get(index.modality).spec.reads_files or not isinstance(value, str):
            raise OneEncoderError(f"only the indexed {index.modality} files of index #{no} are served, "
                                  f"not {field[:40]!r}")
        return index.modality, value

    def decorate(self, no: int, hit: dict[str, Any]) -> dict[str, Any]:
        """What the page shows of a hit: its media (``[(kind, url or svg)]``) and a caption."""
        index = self.indexes[no][1]
        item = hit["item"]
        value = item.get("input")
        media: list[tuple[str, str]] = []
        reads_files = MODALITIES.get(index.modality).spec.reads_files
        if isinstance(value, str):
            if index.modality == _MOLECULE:
                svg = self.drawing(value)
                if svg:
                    media.append(("molecule", svg))
            elif reads_files:
                media.append((media_kind(value), f"media/{no}/{hit['row']}/input"))
        caption = item.get("caption")
        text = (caption if isinstance(caption, str) and caption else None) or (None if reads_files else value)
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


class _BodyTooLarge(Exception):
    """The request body grew past :data:`MAX_BODY` while it was read."""


def _limited(receive: Callable[[], Any], limit: int) -> Callable[[], Any]:
    """An ASGI ``receive`` that raises :class:`_BodyTooLarge` once the body passes ``limit`` bytes
    (a chunked upload has no Content-Length to check first)."""
    seen = 0

    async def limited_receive() -> Any:
        nonlocal seen
        message = await receive()
        if message.get("type") == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge
        return message

    return limited_receive


def _too_large_text() -> str:
    return (f"the request is larger than serve's limit of {MAX_BODY >> 20} MB "
            f"(uploads up to {MAX_UPLOAD >> 20} MB)")


def _write_upload(data: bytes, suffix: str) -> str:
    fd, tmp_path = tempfile.mkstemp(prefix="oneencoder-upload-", suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return tmp_path


def create_app(model_dir: str | Path, index_dirs: Sequence[str | Path], k: int = 8, device: str = "auto",
               workers: int = WORKERS, timeout: float = QUERY_TIMEOUT) -> Any:
    """The Starlette application (an ASGI app for uvicorn or any ASGI server).

    Args:
        workers: Processes that decode queries and draw molecules (see :mod:`.workers`).
        timeout: Seconds one query's decoding may take before it is stopped (a 400 naming the limit).
    """
    require("starlette")
    jinja2 = require("jinja2", "Jinja2")
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, PlainTextResponse, Response
    from starlette.routing import Route

    explorer = Explorer(model_dir, index_dirs, k=k, device=device, workers=workers, timeout=timeout)
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
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return render(413, error=_too_large_text())
        try:
            form = await Request(request.scope, _limited(request.receive, MAX_BODY)).form(max_files=1, max_fields=16)
        except _BodyTooLarge:
            return render(413, error=_too_large_text())
        except Exception as e:  # malformed multipart bodies have several exception types
            return render(400, error=f"could not read the form: {str(e)[:200]}")
        kind = str(form.get("kind") or "text")
        try:
            k_value = int(form.get("k") or explorer.k)
        except (ValueError, TypeError):  # TypeError: a file part named k
            return render(400, error=f"k must be a whole number, got {str(form.get('k'))[:40]!r}")
        k_value = max(1, min(100, k_value))
        tmp_path = None
        try:
            if kind in ("text", "smiles"):
                typed = str(form.get(kind) or "").strip()
                if len(typed) > MAX_QUERY_CHARS:  # before any work: RDKit's cost grows with the size
                    raise OneEncoderError(f"the {kind} query has {len(typed):,} characters, over serve's limit "
                                          f"of {MAX_QUERY_CHARS:,}")
            if kind == "text":
                text = typed
                if not text:
                    raise OneEncoderError("type a text query first")
                if text_modality is None:
                    raise OneEncoderError("this model has no text modality")
                query, value = Query(text_modality, text), text
            elif kind == "smiles":
                smiles = typed
                if not smiles:
                    raise OneEncoderError("paste a SMILES string first")
                if _MOLECULE not in explorer.model.modalities:
                    raise OneEncoderError("this model has no molecule modality")
                query, value = Query(_MOLECULE, smiles), smiles
            elif kind == "file":
                upload = form.get("file")
                if upload is None or isinstance(upload, str) or not upload.filename:
                    raise OneEncoderError("choose a file to upload first")
                name = Path(upload.filename).name
                chosen = str(form.get("as") or "auto")
                if chosen != "auto" and chosen not in file_modalities:  # `as=text` would embed the temp path
                    raise OneEncoderError(f"as={chosen[:40]!r}: an upload is read as one of this model's file "
                                          f"modalities ({', '.join(file_modalities) or 'none'})")
                data = await upload.read(MAX_UPLOAD + 1)
                if len(data) > MAX_UPLOAD:
                    raise _BodyTooLarge
                if not data:
                    raise OneEncoderError(f"{name} is empty (0 bytes)")
                modality = (modality_of_file(name, file_modalities, "choose its modality beside the file")
                            if chosen == "auto" else chosen)
                tmp_path = await run_in_threadpool(_write_upload, data, Path(name).suffix.lower())
                query, value = Query(modality, name, _data_uri(data, name)), tmp_path
            else:
                raise OneEncoderError(f"unknown query kind {kind!r}")
            explorer.model.modality(query.modality)
            # Decoding runs in a worker process and the forward pass in a thread: never on this loop.
            results = await run_in_threadpool(explorer.search, query.modality, value, k_value)
        except _BodyTooLarge:
            return render(413, error=_too_large_text())
        except WorkerError as e:  # it ran past the time limit or crashed its worker
            return render(400, error=f"this {query.modality} query was not read: {e}", form=_shown_form(form))
        except OneEncoderError as e:
            return render(400, error=_message(e, tmp_path, form), form=_shown_form(form))
        except Exception:  # a bug must not take the page down: log it, say so
            log.exception("query failed")
            return render(500, error="the query failed inside the server; see its log", form=_shown_form(form))
        finally:
            if tmp_path:
                Path(tmp_path).unlink(missing_ok=True)

        def decorate() -> list[dict[str, Any]]:  # drawings come from the workers: off the loop too
            if query.modality == _MOLECULE:
                query.preview = explorer.drawing(query.shown)
            return [{**r, "hits": [explorer.decorate(r["no"], h) for h in r["hits"]]} for r in results]

        shown = await run_in_threadpool(decorate)
        return render(query=query, results=shown, form=_shown_form(form))

    async def media(request: Request) -> Response:
        p = request.path_params
        try:
            _, path = explorer.media(int(p["no"]), int(p["row"]), p["field"])
            if media_kind(path) == "image":
                png = await run_in_threadpool(explorer.thumbnail, path)
                return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})
        except (OneEncoderError, OSError, ValueError) as e:
            return PlainTextResponse(f"not found: {e}", status_code=404)
        except Exception as e:  # an undecodable image (PIL and cairosvg raise many types)
            return PlainTextResponse(f"cannot make a thumbnail: {type(e).__name__}", status_code=404)
        if not Path(path).is_file():
            return PlainTextResponse("not found: the file is gone", status_code=404)
        return FileResponse(path)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        yield
        explorer.close()  # the worker processes end with the server

    routes = [Route("/", home, methods=["GET"]), Route("/search", search, methods=["POST"]),
              Route("/search", home, methods=["GET"]), Route("/health", health, methods=["GET"]),
              Route("/media/{no:int}/{row:int}/{field:str}", media, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.explorer = explorer
    return app


def _shown_form(form: Any) -> dict[str, Any]:
    """The form's fields as the page echoes them back: text only, each cut to the query limit."""
    return {key: value[:MAX_QUERY_CHARS] for key, value in form.items() if isinstance(value, str)}


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
