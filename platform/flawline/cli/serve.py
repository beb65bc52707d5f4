"""``flawline serve up|status|down`` (the Ray Serve application on the cluster) and ``flawline
predict`` (ask the server, or with ``--local`` this process, about images; write overlays)."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote, urlencode

import typer
from rich.table import Table

from flawline.cli.app import FlawlineTyper, console, err_console, print_json
from flawline.config import Settings, get_settings
from flawline.errors import ConfigError, FlawlineError, InvalidInput, ServiceError
from flawline.serving.status import serve_address, serve_grpc_port, serve_running, serve_summary

REPO = Path(__file__).resolve().parents[3]
DEFAULT_CONFIG = REPO / "serve" / "config.yaml"

app = FlawlineTyper(help="The serving application on Ray Serve: deploy it, show its state, take it down.")


# -- the Serve config file ------------------------------------------------------------------------
def _first_validation_error(err: Exception) -> str:
    errors = getattr(err, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "config"
        return f"{where}: {first.get('msg', 'invalid')}"
    return str(err).splitlines()[0]


def load_config(path: Path, settings: Settings, app_dir: Path, port: int | None = None,
                grpc_port: int | None = None) -> dict[str, Any]:
    """A Serve config file, checked, with what this installation adds: the HTTP port
    (``--port``, else FLAWLINE_SERVE_PORT when set, else the file's), the gRPC port when the file
    turns gRPC on (``--grpc-port``, else FLAWLINE_SERVE_GRPC_PORT when set, else the file's), the
    settings replicas need to reach the same catalog and S3 (runtime_env env_vars), and
    ``app_dir`` on their PYTHONPATH so ``import_path`` resolves there as it does here."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    if not path.is_file():
        raise InvalidInput(f"{path}: no such Serve config file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InvalidInput(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise InvalidInput(f"{path}: expected a Serve config (a mapping with applications:)")
    try:
        ServeDeploySchema.model_validate(raw)
    except Exception as err:  # pydantic ValidationError
        raise InvalidInput(f"{path}: {_first_validation_error(err)}") from None
    if not raw.get("applications"):
        raise InvalidInput(f"{path}: no applications to deploy")
    from flawline.train.submit import job_env  # the settings a process on the cluster needs

    http = dict(raw.get("http_options") or {})
    if port is not None:
        http["port"] = port
    elif "serve_port" in settings.model_fields_set or "port" not in http:
        http["port"] = settings.serve_port
    if "serve_host" in settings.model_fields_set or "host" not in http:
        http["host"] = settings.serve_host
    raw["http_options"] = http
    grpc = dict(raw.get("grpc_options") or {})
    if grpc.get("grpc_servicer_functions"):  # gRPC on: the port as for HTTP
        if grpc_port is not None:
            grpc["port"] = grpc_port
        elif "serve_grpc_port" in settings.model_fields_set or "port" not in grpc:
            grpc["port"] = settings.serve_grpc_port
        raw["grpc_options"] = grpc
    elif grpc_port is not None:
        raise InvalidInput(f"{path}: --grpc-port given, but the config turns gRPC off (no "
                           "grpc_options.grpc_servicer_functions)")
    for application in raw["applications"]:
        runtime_env = dict(application.get("runtime_env") or {})
        env = {**job_env(settings), **dict(runtime_env.get("env_vars") or {})}
        module = str(application["import_path"]).replace(":", ".").rsplit(".", 1)[0]
        if (app_dir / (module.replace(".", "/") + ".py")).is_file():
            # ${PYTHONPATH}: Ray expands it in the replica to the node's own, so app_dir comes first
            # without dropping what the node was started with (e.g. a checkout's platform/)
            env["PYTHONPATH"] = str(app_dir.resolve()) + f":{env.get('PYTHONPATH') or '${PYTHONPATH}'}"
        runtime_env["env_vars"] = env
        application["runtime_env"] = runtime_env
    return raw


def _client(settings: Settings):  # noqa: ANN202 (ServeSubmissionClient)
    import logging

    logging.getLogger("ray").setLevel(logging.ERROR)
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    try:
        return ServeSubmissionClient(settings.ray_dashboard_url)
    except Exception as err:  # connection refused, not a Ray dashboard, version mismatch
        raise ServiceError(f"no Ray cluster answers at {settings.ray_dashboard_url} ({type(err).__name__}); start "
                           "one with `flawline up` or point FLAWLINE_RAY_DASHBOARD_URL at a cluster's dashboard"
                           ) from None


DEPLOY_ATTEMPTS = 3  # the dashboard answers 500 now and then while Serve's controller starts


def _call(what: str, fn, *args, attempts: int = 1):  # noqa: ANN001, ANN202
    """``fn(*args)``; a 5xx answer is tried again up to ``attempts`` times in all (for idempotent
    calls: a declarative deploy, a status read). Raises ``ServiceError`` in one line."""
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args)
        except Exception as err:  # the SDK raises RuntimeError("Request failed with status code ...: <text>")
            text = " ".join(str(err).split())
            if attempt < attempts and "status code 5" in text:
                time.sleep(3.0 * attempt)
                continue
            where = f" (after {attempts} attempts)" if attempts > 1 else ""
            raise ServiceError(f"Ray Serve {what} failed{where}: {text[:400]}") from None


@app.command("up")
def up(config: Path = typer.Option(DEFAULT_CONFIG, "--config", "-c", help="Serve config file."),
       app_dir: Path = typer.Option(REPO, help="Folder the config's import_path is relative to."),
       port: Optional[int] = typer.Option(None, min=1, max=65535, help="HTTP port (default: FLAWLINE_SERVE_PORT "
                                                                         "when set, else the config's)."),
       grpc_port: Optional[int] = typer.Option(None, min=1, max=65535, help="gRPC port, when the config turns "
                                              "gRPC on (default: FLAWLINE_SERVE_GRPC_PORT when set, else the "
                                              "config's)."),
       timeout: float = typer.Option(300.0, help="Seconds to wait for the application to run."),
       wait: bool = typer.Option(True, help="Wait until every application runs.")) -> None:
    """Deploy the serving application (serve/config.yaml) on the Ray cluster at
    FLAWLINE_RAY_DASHBOARD_URL (the local one `flawline up` starts). Running it again applies a
    changed config in place (batch settings) or by rolling replicas (arguments, resources)."""
    settings = get_settings()
    deploy = load_config(config, settings, app_dir, port, grpc_port)
    client = _client(settings)
    before = _call("status", client.get_serve_details)
    want = f"http://{deploy['http_options']['host']}:{deploy['http_options']['port']}"
    want_grpc = (deploy.get("grpc_options") or {}).get("port")
    if serve_running(before):  # Serve keeps the proxies' options it started with: refuse a change
        have, have_grpc = serve_address(before), serve_grpc_port(before)
        if have and have != want:
            raise InvalidInput(f"Serve already runs on this cluster at {have}; its address cannot change while "
                               f"it runs: `flawline serve down`, then `flawline serve up` for {want}")
        if have_grpc != want_grpc:
            now, then = (f"gRPC on port {p}" if p else "gRPC off" for p in (have_grpc, want_grpc))
            raise InvalidInput(f"Serve already runs on this cluster with {now}; that cannot change while it runs: "
                               f"`flawline serve down`, then `flawline serve up` for {then}")
    _call("deploy", client.deploy_applications, deploy, attempts=DEPLOY_ATTEMPTS)
    names = [a["name"] for a in deploy["applications"]]
    console.print(f"deploying {', '.join(names)} from {config} on {settings.ray_dashboard_url}")
    if not wait:
        return
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    while True:
        details = _call("status", client.get_serve_details)
        apps = details.get("applications") or {}
        states = {n: (apps.get(n) or {}).get("status", "NOT_STARTED") for n in names}
        failed = {n: s for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")}
        if failed:
            name = next(iter(failed))
            message = " ".join(((apps.get(name) or {}).get("message") or "").split())
            raise ServiceError(f"application {name} {failed[name]}: {message[-600:] or 'see the Ray dashboard'}")
        if all(s == "RUNNING" for s in states.values()):
            break
        if time.monotonic() > deadline:
            raise ServiceError(f"applications not running after {timeout:.0f} s: "
                               + ", ".join(f"{n} {s}" for n, s in states.items()))
        time.sleep(1.0)
    console.print(f"serving at {serve_address(details) or want} ({time.monotonic() - started:.0f} s): "
                  f"POST /v1/models/<model>/predict (one image) and /predict/batch (many), GET /v1/models, "
                  "GET /healthz")
    console.print("a replica loads each model on its first request for it: that answer takes seconds longer "
                  "(the model's load time); later ones do not")
    if serve_grpc_port(details):
        console.print(f"gRPC (serve/flawline.proto) on port {serve_grpc_port(details)}, every interface: "
                      "flawline.Inspection/Predict and /PredictMany")


@app.command("status")
def status(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Applications, deployments and replicas on the cluster; exits 1 if nothing runs."""
    settings = get_settings()
    details = _call("status", _client(settings).get_serve_details)
    rows = serve_summary(details)
    address = serve_address(details) if serve_running(details) else None
    if as_json:
        print_json({"address": address, "grpc_port": serve_grpc_port(details) if address else None,
                    "dashboard": settings.ray_dashboard_url, "deployments": rows})
    elif not rows:
        console.print(f"Ray Serve runs no application on {settings.ray_dashboard_url}")
    else:
        table = Table("application", "status", "deployment", "status", "replicas", "message")
        for r in rows:
            table.add_row(r["application"], r["app_status"], r["deployment"], r["status"],
                          f"{r['replicas_running']}/{r['replicas_target']}", r["message"][:80])
        console.print(table)
        console.print(f"HTTP {address}" + (f", gRPC port {serve_grpc_port(details)}" if serve_grpc_port(details) else ""))
    if not rows or any(r["app_status"] != "RUNNING" for r in rows):
        raise typer.Exit(1)


@app.command("down")
def down() -> None:
    """Delete every Serve application on the cluster and shut Serve (and its HTTP proxy) down."""
    settings = get_settings()
    client = _client(settings)
    details = _call("status", client.get_serve_details)
    if not serve_running(details):
        console.print(f"Ray Serve was not running on {settings.ray_dashboard_url}")
        return
    _call("shutdown", client.delete_applications)
    console.print(f"Ray Serve shut down on {settings.ray_dashboard_url}")


# -- flawline predict ------------------------------------------------------------------------------
class _ModelLevel(ServiceError):
    """The model cannot answer at all (unknown, cannot be loaded): stop, it holds for every image."""


BATCH_BYTES = 24 * 2**20  # one batch request's images, under the server's 32 MiB request bound


def _multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data request with one ``image`` part per file."""
    boundary = f"flawline-{uuid.uuid4().hex}"
    chunks = []
    for name, data in files:
        safe = name.replace('"', "_").replace("\r", "_").replace("\n", "_")
        chunks += [f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{safe}\"\r\n"
                   "Content-Type: application/octet-stream\r\n\r\n".encode(), data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def _read_file(path: Path) -> bytes:
    """The file's bytes; InvalidInput (one line naming it) when it is missing or cannot be read."""
    if not path.is_file():
        raise InvalidInput(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        return path.read_bytes()
    except OSError as err:
        raise InvalidInput(f"{path}: cannot read file ({err.strerror or err})") from None


def _batches(paths: list[Path], size: int, max_bytes: int = BATCH_BYTES) -> list[list[Path]]:
    """``paths`` in order, in groups of at most ``size`` files and ``max_bytes`` bytes (a larger file alone)."""
    groups: list[list[Path]] = [[]]
    total = 0
    for path in paths:
        n = path.stat().st_size if path.is_file() else 0  # a missing file gets its own error later
        if groups[-1] and (len(groups[-1]) >= size or total + n > max_bytes):
            groups.append([])
            total = 0
        groups[-1].append(path)
        total += n
    return groups


def _post(url: str, data: bytes, timeout: float, content_type: str = "application/octet-stream") -> dict[str, Any]:
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        try:
            message = json.loads(err.read()).get("error") or err.reason
        except (ValueError, AttributeError):
            message = err.reason
        if err.code in (404, 503):
            raise _ModelLevel(f"{message} (HTTP {err.code})") from None
        raise InvalidInput(f"{message} (HTTP {err.code})") from None
    except urllib.error.URLError as err:
        raise ServiceError(f"no flawline server answers at {url.split('/v1/')[0]} ({err.reason}); start it with "
                           "`flawline serve up`, or use --local") from None
    except TimeoutError:
        raise ServiceError(f"the server at {url.split('/v1/')[0]} did not answer within {timeout:.0f} s") from None


@dataclass(frozen=True)
class _Maps:
    """What ``flawline predict`` asks the server to add to each verdict: the heatmap and regions
    for the overlay (``--out``), the defect mask for ``--maps``."""

    overlay: bool = False
    mask: bool = False

    def flags(self) -> dict[str, bool]:
        """The request flags, as the HTTP query, the gRPC request and the local path name them."""
        return {"heatmap": self.overlay, "mask": self.mask, "regions": self.overlay}


class _HTTPServer:
    """``flawline predict``'s requests over HTTP: one image per request, or batch requests."""

    def __init__(self, base: str, model: str, maps: _Maps, timeout: float, reference: str | None = None) -> None:
        if not base.startswith(("http://", "https://")):
            raise ConfigError(f"--url {base!r}: expected http://host:port")
        params = {k: "true" for k, v in maps.flags().items() if v}
        if reference:
            params["reference"] = reference
        query = f"?{urlencode(params)}" if params else ""
        self.endpoint = f"{base}/v1/models/{quote(model, safe=':')}/predict{query}"
        self.batch_endpoint = f"{base}/v1/models/{quote(model, safe=':')}/predict/batch{query}"
        self.timeout = timeout

    def one(self, data: bytes, name: str) -> dict[str, Any]:
        return _post(self.endpoint, data, self.timeout)

    def many(self, files: list[tuple[str, bytes]]) -> list[dict[str, Any] | Exception]:
        body, content_type = _multipart(files)
        try:
            answer = _post(self.batch_endpoint, body, self.timeout * len(files), content_type)
        except InvalidInput as err:  # the request as a whole (e.g. too large): each of its images
            return [err] * len(files)
        return [InvalidInput(f"{r['error']} (HTTP {r['status']})") if r["status"] != 200 else
                {**{k: v for k, v in r.items() if k != "status"}, "request_images": len(files)}
                for r in answer["results"]]


class _GRPCServer:
    """``flawline predict --grpc``: the same requests through the gRPC API (``grpc_client``)."""

    def __init__(self, address: str, model: str, maps: _Maps, timeout: float, reference: str | None = None) -> None:
        from flawline.serving.grpc_client import InspectionClient

        if "://" in address or ":" not in address:
            raise ConfigError(f"--url {address!r}: with --grpc, expected host:port")
        self.client = InspectionClient(address, timeout=timeout, connect_timeout=min(timeout, 10.0))
        self.model, self.maps, self.timeout = model, maps, timeout
        self.reference = reference or ""

    def _refused(self, err: Exception) -> Exception:
        from flawline.serving.grpc_client import InspectionError

        if not isinstance(err, InspectionError):
            return err
        if err.code in ("NOT_FOUND", "UNAVAILABLE"):
            return _ModelLevel(f"{err} ({err.code})")
        return InvalidInput(f"{err} ({err.code})")

    def one(self, data: bytes, name: str) -> dict[str, Any]:
        try:
            return self.client.predict(self.model, data, name=name, **self.maps.flags(), reference_uri=self.reference)
        except FlawlineError as err:
            raise self._refused(err) from None

    def many(self, files: list[tuple[str, bytes]]) -> list[dict[str, Any] | Exception]:
        try:
            answer = self.client.predict_many(self.model, files, **self.maps.flags(), reference_uri=self.reference,
                                              timeout=self.timeout * len(files))
        except FlawlineError as err:
            refused = self._refused(err)
            if not isinstance(refused, InvalidInput):
                raise refused from None
            return [refused] * len(files)
        return [InvalidInput(f"{r['error']} ({r['code']})") if r["code"] != "OK" else
                {**{k: v for k, v in r.items() if k != "code"}, "request_images": len(files)}
                for r in answer["results"]]


class _InProcess:
    """``flawline predict --local``: the serving path in this process; the reference image (an s3://
    URI in the store or a local file) read and checked once, for every image."""

    def __init__(self, settings: Settings, model: str, maps: _Maps, reference: str | None = None) -> None:
        from flawline.serving.local import LocalPredictor

        self.predictor, self.model, self.maps = LocalPredictor(settings), model, maps
        self.reference = None
        if reference and reference.startswith("s3://"):
            self.reference = self.predictor.reference(reference)
        elif reference:
            try:
                self.reference = self.predictor.reference(reference, _read_file(Path(reference)))
            except InvalidInput as err:
                raise InvalidInput(f"--reference {str(err).removeprefix('reference ')}") from None

    def one(self, data: bytes, name: str) -> dict[str, Any]:
        return self.predictor.predict(self.model, data, name, **self.maps.flags(), reference=self.reference)


def predict(
    images: list[Path] = typer.Argument(..., help="Image files."),
    model: str = typer.Option(..., "--model", "-m", help="name (its production version, else its newest) or "
                              "name:version."),
    local: bool = typer.Option(False, "--local", help="Run the model in this process instead of asking the server."),
    use_grpc: bool = typer.Option(False, "--grpc", help="Ask the server through its gRPC API (serve/flawline.proto) "
                                  "(host FLAWLINE_SERVE_HOST, port FLAWLINE_SERVE_GRPC_PORT) instead of HTTP."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write <image>.overlay.png (heatmap and defect "
                                       "regions over the image) into this folder."),
    maps: bool = typer.Option(False, "--maps", help="With --out, also write <image>.heatmap.png (the anomaly map "
                              "in gray: black at 0, white at twice the threshold; without one, at the map's maximum) "
                              "and <image>.mask.png (the defect mask), at the model's input size."),
    url: Optional[str] = typer.Option(None, help="Server address, http://host:port (default: host FLAWLINE_SERVE_HOST, "
                                      "port FLAWLINE_SERVE_PORT); with --grpc, host:port (default: host "
                                      "FLAWLINE_SERVE_HOST, port FLAWLINE_SERVE_GRPC_PORT)."),
    timeout: float = typer.Option(60.0, help="Seconds to wait for each answer."),
    batch: int = typer.Option(32, "--batch", min=1, max=64, help="Images per request to the server: several "
                              "files go as batch inspection requests of up to this many images (and 24 MiB), "
                              "paying the HTTP cost once per batch; 1 sends one request per image."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (maps and PNGs left out)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="The defect-free reference image every "
                                            "image is compared with, for models that compare each image with its "
                                            "reference (the `reference` detector; other models refuse one): an "
                                            "s3://<bucket>/<key> in the server's store (the product's golden image, "
                                            "uploaded once); with --local also a local file."),
) -> None:
    """Score images with a registered model: verdict, score and threshold per image; with --out,
    overlay images. Bad or missing images get one `error:` line each (with --json: an entry with
    "error") and exit code 1; the others are scored. A model that compares each image with its
    defect-free reference needs --reference (one for all the images: one product)."""
    from flawline.serving.errors import RequestError
    from flawline.serving.response import overlay_png

    settings = get_settings()
    if local and use_grpc:
        raise InvalidInput("--local and --grpc: choose one (--local asks no server)")
    if out is not None:
        if out.exists() and not out.is_dir():
            raise InvalidInput(f"{out}: exists and is not a folder")
        out.mkdir(parents=True, exist_ok=True)
    if reference is not None and not local and not reference.startswith("s3://"):
        raise InvalidInput(f"--reference {reference}: the server reads references from its store; give an "
                           "s3://<bucket>/<key> URI (a local file works with --local)")
    if maps and out is None:
        raise InvalidInput("--maps writes the heatmap and mask PNGs into a folder: give --out DIR")
    wanted = _Maps(overlay=out is not None, mask=maps)
    if local:
        server: Any = _InProcess(settings, model, wanted, reference)
    elif use_grpc:
        server = _GRPCServer(url or settings.serve_grpc_address, model, wanted, timeout, reference)
    else:
        server = _HTTPServer((url or settings.serve_url).rstrip("/"), model, wanted, timeout, reference)

    def answers():  # noqa: ANN202 — (path, its bytes, its answer or the error it alone gets), in order
        if local or batch == 1 or len(images) == 1:
            for path in images:
                try:
                    data = _read_file(path)
                    yield path, data, server.one(data, path.name)
                except (InvalidInput, RequestError) as err:
                    yield path, b"", err
            return
        for group in _batches(images, batch):
            files, unread = [], {}  # (position in group, path, bytes); position → its read error
            for at, path in enumerate(group):  # a file that cannot be read is answered alone; the others go
                try:
                    files.append((at, path, _read_file(path)))
                except InvalidInput as err:
                    unread[at] = err
            answered: dict[int, Any] = {}
            if files:  # latency_ms in each answer is the whole request's
                results = server.many([(path.name, data) for _, path, data in files])
                answered = {at: (data, result) for (at, _, data), result in zip(files, results)}
            for at, path in enumerate(group):  # in the order given
                yield (path, b"", unread[at]) if at in unread else (path, *answered[at])

    results, failures, used = [], 0, set()
    for path, data, result in answers():
        if isinstance(result, Exception):
            failures += 1
            # messages name the image by its file name; the path says it already
            message = str(result).removeprefix(f"{path}: ").removeprefix(f"{path.name}: ")
            typer.echo(f"error: {path}: {message}", err=True)
            results.append({"image": str(path), "error": message})
            continue
        result["image"] = str(path)
        if out is not None:
            stem = path.stem if path.stem not in used else f"{path.stem}-{len(used)}"
            used.add(stem)
            target = out / f"{stem}.overlay.png"
            target.write_bytes(overlay_png(data, result))
            result["overlay"] = str(target)
            for key, kind in (("heatmap_png", "heatmap"), ("mask_png", "mask")) if maps else ():
                if result.get(key):
                    written = out / f"{stem}.{kind}.png"
                    written.write_bytes(base64.b64decode(result[key]))
                    result[kind] = str(written)
        results.append({k: v for k, v in result.items() if k not in ("heatmap_png", "mask_png")})
        if not as_json:
            verdict = {True: "DEFECT", False: "ok", None: "no threshold"}[result["is_defect"]]
            threshold = "-" if result["threshold"] is None else f"{result['threshold']:.4g}"
            n = result.get("request_images", 1)
            latency = f"{result['latency_ms']:.1f} ms" + (f" for its request of {n} images" if n > 1 else "")
            typer.echo(f"{path}  {verdict}  score {result['score']:.4g}  threshold {threshold}  "
                       f"{result['model']}:{result['model_version']}  {latency}"
                       + (f"  → {result['overlay']}" if out is not None else ""))
    if as_json:
        print_json(results)
    if failures:
        if not as_json:
            err_console.print(f"{failures} of {len(images)} image(s) failed")
        raise typer.Exit(1)
