"""The retrieval explorer: one server-rendered page over a model and its indexes (Starlette).

Serve knows no modality by name: each one's spec and methods say how the page treats it.
``GET /`` shows a box for every modality of the model whose spec names a ``typed_query``
(the free-text one, whose records are captions, first), and one upload form for the
modalities that read files. ``POST /search`` embeds the query once and shows the top k of
every index with scores. A hit shows the modality's own picture of its input
(``Modality.depict``, e.g. a drawn molecule) and, for a file, what its MIME type calls for:
a thumbnail for ``image/*``, a player for ``audio/*`` and ``video/*``, else a link. Files
are served only when they are the indexed inputs of a file modality
(``GET /media/{index}/{row}/input``), never by a path or another field of the item. A query
the model cannot read (a corrupt upload, a wrong SMILES) is a message on the page with
status 400; one over a limit gets a 4xx naming the limit; the server goes on serving.

The event loop never runs native work: decoding and featurising the query, pictures and
thumbnails run in a few worker processes (:mod:`.workers`) with a time limit per job, so a
hostile input that hangs or crashes its worker fails alone while ``/health`` and every
other request are answered; the model's forward pass runs in a thread.
"""

from __future__ import annotations

import base64
import contextlib
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
from ...modality import MODALITIES, Modality
from ..api import OneEncoder, load
from ..index import VectorIndex, load_index
from ..zeroshot import caption_modality
from .workers import WorkerError, WorkerPool

log = logging.getLogger("oneencoder.apps.serve")

#: Largest upload read (bytes); a bigger one is a message on the page (413).
MAX_UPLOAD = 50 << 20
#: Largest request body (bytes): an upload plus room for the form's other fields; more is a 413.
MAX_BODY = MAX_UPLOAD + (1 << 20)
#: Longest typed query (characters); a longer one is a 400 before any work. Longer inputs of
#: an index are not sent to be drawn either (``Modality.depict``).
MAX_QUERY_CHARS = 10_000
#: Images thumbnailed only up to this many pixels (as the image modalities' own limit).
MAX_THUMB_PIXELS = 8192 * 8192
#: Default seconds one query's decoding, featurising or one picture may take in a worker.
QUERY_TIMEOUT = 30.0
#: Default worker processes for that work (queries decoded at once).
WORKERS = 2
_THUMB = 224  # px, longest side of a result thumbnail
_PREVIEW_MAX = 8 << 20  # uploads up to this size are echoed back inline on the results page
_UPLOAD = "file"  # the upload form's ``kind``
_FORM_FIELDS = {_UPLOAD, "kind", "as", "k"}  # names a typed query's box cannot take


@dataclass
class Query:
    """One query as the page shows it."""

    modality: str
    shown: str  # the typed query, or the uploaded file's name
    preview: str | None = None  # data: URI of an uploaded image, sound or video
    picture: str | None = None  # SVG of a typed query, drawn by its modality (``Modality.depict``)


@dataclass(frozen=True)
class QueryForm:
    """One query form of the page: a typed box for one modality, or the upload for the file modalities."""

    kind: str  # the form's ``kind`` field; a typed box's input field has the same name
    label: str
    modalities: tuple[str, ...]
    example: str = ""


def _depicts(modality: str) -> bool:
    """Whether the modality draws its inputs (overrides ``Modality.depict``): only then a worker is asked."""
    return MODALITIES.get(modality).depict is not Modality.depict


def _typed_modalities() -> dict[str, str]:
    """Typed query field -> modality, for every registered modality (to name what a model lacks)."""
    specs = [MODALITIES.get(name).spec for name in MODALITIES.names()]
    return {spec.typed_query: spec.name for spec in specs if spec.typed_query and not spec.reads_files}


def query_forms(modalities: Sequence[str], free_text: str | None) -> list[QueryForm]:
    """The page's query forms, from the modalities' specs: the ``free_text`` modality's box,
    then the upload for every modality that reads files, then the other typed boxes.

    A typed box whose name another form already uses is left out, with a warning.
    """
    typed: list[QueryForm] = []
    files: list[str] = []
    for name in modalities:
        spec = MODALITIES.get(name).spec
        if spec.reads_files:
            files.append(name)
        elif spec.typed_query:
            if spec.typed_query in _FORM_FIELDS | {f.kind for f in typed}:
                log.warning("the %s modality's typed query %r clashes with another form field; it has no box",
                            name, spec.typed_query)
                continue
            typed.append(QueryForm(spec.typed_query, spec.typed_query_label or name, (name,),
                                   spec.typed_query_example))
    upload = [QueryForm(_UPLOAD, f"File ({', '.join(files)})", tuple(files))] if files else []
    first = [f for f in typed if f.modalities[0] == free_text]
    return first + upload + [f for f in typed if f not in first]


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


def _depict_job(modality: str, value: Any) -> str | None:
    """The modality's picture of one input (``Modality.depict``): what may be slow or crash."""
    return _WORKER_MODALITIES[modality].depict(value)


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
        timeout: Seconds one query's decoding (or one picture, one thumbnail) may take.
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
        self._pictures, self._thumbnails = _Memo(2048), _Memo(1024)
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

    def depiction(self, modality: str, value: Any) -> str | None:
        """The modality's SVG of one input, drawn in a worker (cached).

        None when the modality draws nothing, or for this input (unreadable, too large, too
        slow, crashed its worker): the page shows the input without a picture.
        """
        def draw() -> str | None:
            try:
                return self.pool.call(_depict_job, modality, value, timeout=self.timeout)
            except (OneEncoderError, RuntimeError) as e:
                log.warning("no picture of a %d-character %s input: %s", len(value), modality, e)
                return None

        if not _depicts(modality) or not isinstance(value, str) or len(value) > MAX_QUERY_CHARS:
            return None  # not even sent to a worker
        return self._pictures.get((modality, value), draw)

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
        """What the page shows of a hit: its modality's ``picture`` (SVG), its ``file`` (a URL)
        with the file's ``mime`` type, and its ``caption`` (else a typed input itself)."""
        index = self.indexes[no][1]
        item = hit["item"]
        value = item.get("input")
        reads_files = MODALITIES.get(index.modality).spec.reads_files
        shown: dict[str, Any] = {"picture": None, "file": None, "mime": ""}
        if isinstance(value, str):
            shown["picture"] = self.depiction(index.modality, value)
            if reads_files:
                shown.update(file=f"media/{no}/{hit['row']}/input", mime=mime_type(value))
        caption = item.get("caption")
        words = (caption if isinstance(caption, str) and caption else None) or (None if reads_files else value)
        return {**hit, **shown, "caption": words}


def mime_type(path: str) -> str:
    """The file's MIME type from its name (``""`` if unknown): the page shows ``image/*`` as a
    thumbnail, ``audio/*`` and ``video/*`` in a player, anything else as a link."""
    return mimetypes.guess_type(path)[0] or ""


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
        workers: Processes that decode queries and draw pictures (see :mod:`.workers`).
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
    try:
        free_text: str | None = caption_modality(explorer.model)  # the modality whose records are captions
    except OneEncoderError:
        free_text = None
    forms = query_forms(explorer.model.modalities, free_text)
    by_kind = {f.kind: f for f in forms}
    file_modalities = list(by_kind[_UPLOAD].modalities) if _UPLOAD in by_kind else []
    typed_anywhere = _typed_modalities()  # so a box this model lacks names the modality it needs

    def render(status: int = 200, **context: Any) -> HTMLResponse:
        html = page.render(model=explorer.model, indexes=explorer.indexes, k=explorer.k, forms=forms,
                           upload=_UPLOAD, **context)
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
        kind = str(form.get("kind") or (forms[0].kind if forms else _UPLOAD))
        try:
            k_value = int(form.get("k") or explorer.k)
        except (ValueError, TypeError):  # TypeError: a file part named k
            return render(400, error=f"k must be a whole number, got {str(form.get('k'))[:40]!r}")
        k_value = max(1, min(100, k_value))
        tmp_path = None
        try:
            if kind != _UPLOAD and (kind in by_kind or kind in typed_anywhere):
                typed = str(form.get(kind) or "").strip()
                if len(typed) > MAX_QUERY_CHARS:  # before any work: a parser's cost may grow with the size
                    raise OneEncoderError(f"the {kind} query has {len(typed):,} characters, over serve's limit "
                                          f"of {MAX_QUERY_CHARS:,}")
                if not typed:
                    raise OneEncoderError(f"type a {kind} query first")
                if kind not in by_kind:
                    raise OneEncoderError(f"this model has no {typed_anywhere[kind]} modality")
                query, value = Query(by_kind[kind].modalities[0], typed), typed
            elif kind == _UPLOAD:
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

        def decorate() -> list[dict[str, Any]]:  # pictures come from the workers: off the loop too
            if kind != _UPLOAD:
                query.picture = explorer.depiction(query.modality, query.shown)
            return [{**r, "hits": [explorer.decorate(r["no"], h) for h in r["hits"]]} for r in results]

        shown = await run_in_threadpool(decorate)
        return render(query=query, results=shown, form=_shown_form(form))

    async def media(request: Request) -> Response:
        p = request.path_params
        try:
            _, path = explorer.media(int(p["no"]), int(p["row"]), p["field"])
            if mime_type(path).startswith("image/"):
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
