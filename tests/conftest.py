"""Shared fixtures: a tiny random SigLIP checkpoint, the transformers reference computation on it, a loopback
image server, and real ``bentoml serve`` processes running the service on that checkpoint.

Nothing here reaches the network beyond 127.0.0.1.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import itertools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# BentoML's /metrics reads prometheus_client's multiprocess files, as in its workers: the services built in this
# process (``InProcessService``) need the directory set before prometheus_client is first imported.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="siglip-test-metrics-"))


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child process, plus ``extra``, without the PROMETHEUS_MULTIPROC_DIR set
    above: a child that writes its metric files there mixes them into the in-process services' /metrics, and
    children in PID namespaces of their own (Ray's), whose PIDs repeat, write into each other's files."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    return {**env, **extra}


# ---------------------------------------------------------------------------------------------------------------
# checkpoint and reference
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return _tiny_checkpoint(tmp_path_factory)


_TINY: list[Path] = []


def _tiny_checkpoint(tmp_path_factory) -> Path:
    """The session's one tiny checkpoint, built when first asked for (by the fixture or ``pytest_sessionstart``)."""
    if not _TINY:
        from siglip.model.checkpoint import build_checkpoint

        _TINY.append(build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-siglip", size="tiny"))
    return _TINY[0]


class Reference:
    """The transformers reference computation: processor + model.get_*_features, fp32, as documented for
    google/siglip2-base-patch16-512 (convert to RGB first, lowercase, max_length padding to the checkpoint's text
    length, no mask). Any SigLIP / SigLIP 2 checkpoint: NaFlex ones get the processor's mask and grid shapes too,
    and ``max_num_patches`` per call."""

    def __init__(self, path: Path):
        import torch
        from transformers import AutoModel, AutoProcessor

        self.torch = torch
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        self.processor = AutoProcessor.from_pretrained(path)
        self.text_length = int(self.model.config.text_config.max_position_embeddings)
        self.logit_scale = float(self.model.logit_scale)
        self.logit_bias = float(self.model.logit_bias)

    def image_embeds(self, images: list[Image.Image], **processor_kw) -> np.ndarray:
        rgb = [ImageOps.exif_transpose(im).convert("RGB") for im in images]
        inputs = self.processor(images=rgb, return_tensors="pt", **processor_kw)
        names = ("pixel_values", "pixel_attention_mask", "spatial_shapes")
        with self.torch.no_grad():
            out = self.model.get_image_features(**{k: inputs[k] for k in names if k in inputs}).pooler_output
        return self.torch.nn.functional.normalize(out, dim=-1).numpy()

    def text_embeds(self, texts: list[str], lower: bool = True) -> np.ndarray:
        """``lower=False``: the text as given, for tokenizers that canonicalize by themselves (SigLIP 1's, and
        Siglip2Tokenizer of the NaFlex checkpoints)."""
        enc = self.processor(text=[t.lower() if lower else t for t in texts], padding="max_length",
                             max_length=self.text_length,
                             truncation=True, return_tensors="pt")
        with self.torch.no_grad():
            out = self.model.get_text_features(input_ids=enc["input_ids"]).pooler_output
        return self.torch.nn.functional.normalize(out, dim=-1).numpy()

    def zero_shot(self, image: Image.Image, labels: list[str], template: str = "This is a photo of {}.",
                  fn: str = "softmax", **processor_kw) -> list[tuple[str, float]]:
        cos = self.image_embeds([image], **processor_kw) @ self.text_embeds([template.format(x) for x in labels]).T
        logits = cos[0] * np.exp(self.logit_scale) + self.logit_bias
        if fn == "softmax":
            e = np.exp(logits - logits.max())
            scores = e / e.sum()
        else:
            scores = 1 / (1 + np.exp(-logits))
        return sorted(zip(labels, scores.tolist()), key=lambda p: -p[1])


@pytest.fixture(scope="session")
def reference(tiny_checkpoint) -> Reference:
    return Reference(tiny_checkpoint)


# ---------------------------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------------------------
def make_image(seed: int = 0, size: tuple[int, int] = (96, 72), mode: str = "RGB") -> Image.Image:
    """A distinct, structured test picture (gradients + blocks), so different seeds embed differently."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * (seed + 3) * 7) % 256, (yy * (seed + 5) * 5) % 256,
                     ((xx + yy) * (seed + 1) * 3) % 256], axis=-1).astype(np.uint8)
    for _ in range(6):
        x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
        base[y0:y0 + h // 4, x0:x0 + w // 4] = rng.integers(0, 256, 3)
    img = Image.fromarray(base, "RGB")
    return img if mode == "RGB" else img.convert(mode)


def encode(img: Image.Image, fmt: str = "PNG", **save_kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save_kw)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def wait_for(predicate: Callable, deadline_s: float, what: str, log: Callable[[], str] = lambda: ""):
    """Poll ``predicate`` until it returns something truthy (returned) or ``deadline_s`` passes (AssertionError
    naming ``what``, the last value and the tail of ``log()``)."""
    deadline = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {deadline_s} s (last: {last!r})\n{log()[-4000:]}")


def cosine(a, b) -> float:
    """Of two vectors (any shape holding one vector: (D,) or (1, D))."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def cosine_rows(a, b) -> np.ndarray:
    """Row by row, of two (N, D) arrays."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# ---------------------------------------------------------------------------------------------------------------
# loopback image server
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    content_type: str = "image/png"
    delay_s: float = 0.0  # sleep before answering (a server that never answers in time)
    headers: dict[str, str] = field(default_factory=dict)


class ImageServer:
    """A threaded HTTP server on 127.0.0.1. ``add(path, Route)`` serves bytes; ``/redirect?to=URL`` answers 302."""

    def __init__(self):
        self.routes: dict[str, Route] = {}
        self.hits: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                parts = urlsplit(self.path)
                server.hits[parts.path] = server.hits.get(parts.path, 0) + 1
                if parts.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", parse_qs(parts.query)["to"][0])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                route = server.routes.get(parts.path)
                if route is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if route.delay_s:
                    time.sleep(route.delay_s)
                try:
                    self.send_response(route.status)
                    self.send_header("Content-Type", route.content_type)
                    self.send_header("Content-Length", str(len(route.body)))
                    for k, v in route.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(route.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def add(self, path: str, route: Route | bytes) -> str:
        self.routes[path] = route if isinstance(route, Route) else Route(route)
        return self.url(path)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="session")
def image_server():
    srv = ImageServer()
    yield srv
    srv.close()


# ---------------------------------------------------------------------------------------------------------------
# real `bentoml serve` processes
# ---------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """``bentoml serve`` from the repo root on a free loopback port, with the given SIGLIP_* settings."""

    def __init__(self, env: dict[str, str], log_path: Path, wrap: tuple[str, ...] = (), host: str = "127.0.0.1"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        # Each server its own BENTOML_HOME: `bentoml serve` empties $BENTOML_HOME/prometheus_multiproc_dir when it
        # starts, which would wipe the /metrics of every server started before it.
        home = log_path.parent / "bentoml-home"
        home.mkdir(exist_ok=True)
        # ...and its own OpenVINO cache, so tests never write converted models into ~/.cache.
        full_env = child_env(**{"BENTOML_DO_NOT_TRACK": "True", "PYTHONUNBUFFERED": "1", "BENTOML_HOME": str(home),
                                "SIGLIP_OPENVINO_CACHE_DIR": str(home / "openvino-cache"), **env})
        self.home = Path(full_env["BENTOML_HOME"])
        self._client: httpx.Client | None = None
        self._log = open(log_path, "wb")  # noqa: SIM115 - kept open for the process lifetime, closed in stop()
        # ``wrap``: a command that execs the rest (e.g. unshare + mount), so proc.pid is still bentoml's main process.
        self.proc = subprocess.Popen(
            [*wrap, sys.executable, "-m", "bentoml", "serve", "--host", host, "--port", str(self.port)],
            cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 180.0) -> ServiceProcess:
        deadline = time.monotonic() + timeout_s
        # One client for the whole wait: httpx.get builds a TLS context per call (~80 ms of CPU here), which at
        # four polls a second takes a third of a core from the model loading beside it.
        with httpx.Client(timeout=2) as probe:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"bentoml serve exited with {self.proc.returncode}:\n{self.log()[-6000:]}")
                try:
                    if probe.get(self.url + "/readyz").status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.25)
        raise RuntimeError(f"service not ready after {timeout_s} s:\n{self.log()[-6000:]}")

    def log(self) -> str:
        """The whole server log (start-up lines included)."""
        return self.log_path.read_text(errors="replace")

    def post(self, path: str, body=None, **kw) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=kw.pop("timeout", 60), **kw)

    @property
    def client(self) -> httpx.Client:
        """An httpx client on this server (paths relative), as ``InProcessService.client`` is on its app."""
        if self._client is None:
            self._client = httpx.Client(base_url=self.url, timeout=60)
        return self._client

    def terminate(self) -> None:
        """Ask the server to stop (SIGTERM to its process group); ``stop`` waits for it."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)

    def stop(self) -> None:
        self.terminate()
        if self._client is not None:
            self._client.close()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()


def serve(tmp_path_factory, tiny_checkpoint: Path, wrap: tuple[str, ...] = (), host: str = "127.0.0.1",
          **env: str) -> ServiceProcess:
    return ServiceProcess({"SIGLIP_MODEL": str(tiny_checkpoint), **env},
                          tmp_path_factory.mktemp("serve") / "serve.log", wrap, host)


@pytest.fixture(scope="session")
def start_service(tmp_path_factory, tiny_checkpoint) -> Callable[..., ServiceProcess]:
    """Start a service with extra SIGLIP_* env (waiting for /readyz unless ready=False); all are stopped at the
    end of the session. For a server several tests share, declare a ``server_fixture`` instead."""
    started: list[ServiceProcess] = []

    def start(ready: bool = True, wrap: tuple[str, ...] = (), host: str = "127.0.0.1",
              adopt: ServiceProcess | None = None, **env: str) -> ServiceProcess:
        """``host`` other than loopback only with a ``wrap`` that puts the server in a network namespace of its own
        (``isolated_network``): nothing here listens beyond loopback. ``adopt``: a server started with these
        settings before the fixtures existed."""
        svc = adopt or serve(tmp_path_factory, tiny_checkpoint, wrap, host, **env)
        started.append(svc)
        return svc.wait_ready() if ready else svc

    yield start
    for svc in started:  # all asked at once: each drains for a while
        svc.terminate()
    for svc in started:
        svc.stop()


# ---------------------------------------------------------------------------------------------------------------
# shared servers, one per settings profile, each started while the tests before its first user run
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    """The settings of a real server that every test asking for the fixture ``name`` shares."""

    name: str
    env: tuple[tuple[str, str | Callable[[pytest.TempPathFactory], str]], ...]  # a callable: made at the start
    ready: bool = True  # False: the fixture hands over the server without waiting for /readyz (nor asking it)

    def settings(self, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
        return {k: v(tmp_path_factory) if callable(v) else v for k, v in self.env}


PROFILES: dict[str, Profile] = {}  # filled as test modules are imported, so complete before the first test runs
_FIRST_USE: list[str] = []  # profile names in the order the selected tests first ask for them


def server_fixture(name: str, *, scope: str = "module", ready: bool = True, doc: str = "",
                   **env: str | Callable[[pytest.TempPathFactory], str]):
    """A fixture ``name`` serving a real server with these SIGLIP_* settings (the tiny checkpoint unless
    SIGLIP_MODEL is set; a value may be a function of ``tmp_path_factory``, called when the server starts).
    Declared at module level: the session then knows, before any test runs, which profiles the selected tests use
    and in which order, and starts the next one in the background when one is handed over. A start costs ~7 s
    here, mostly one core importing torch, so it overlaps the tests before it."""
    if name in PROFILES:
        raise ValueError(f"server profile {name!r} is declared twice")
    profile = PROFILES[name] = Profile(name, tuple(env.items()), ready)

    def fixture(servers: Servers):
        yield servers.get(profile)
        servers.release(profile)

    fixture.__doc__ = doc
    return pytest.fixture(scope=scope, name=name)(fixture)


def pytest_collection_finish(session) -> None:
    """The profiles' first-use order, from the final selection (after -k, -m, --lf and --ff drop or reorder)."""
    _FIRST_USE.clear()
    for item in session.items:
        for name in getattr(item, "fixturenames", ()):  # the closure: fixtures asked for through others too
            if name in PROFILES and name not in _FIRST_USE:
                _FIRST_USE.append(name)


class Servers:
    """The profile servers of the session: each started once (at the latest when first asked for), and the next
    profile in first-use order started in the background whenever one is handed over."""

    def __init__(self, start: Callable[..., ServiceProcess], tmp_path_factory: pytest.TempPathFactory):
        self._start, self._tmp_path_factory = start, tmp_path_factory
        self._launched: dict[str, ServiceProcess | BaseException] = {}
        self._released: set[str] = set()

    def _launch(self, profile: Profile) -> ServiceProcess:
        if profile.name not in self._launched:
            early = _STARTED_WHILE_COLLECTING.pop(profile.name, None)
            try:
                self._launched[profile.name] = self._start(ready=False, adopt=early,
                                                           **profile.settings(self._tmp_path_factory))
            except Exception as exc:  # noqa: BLE001 - raised to this profile's own tests, not the one handed over
                self._launched[profile.name] = exc
        launched = self._launched[profile.name]
        if isinstance(launched, BaseException):
            raise RuntimeError(f"server profile {profile.name!r} did not start") from launched  # noqa: TRY004
        return launched

    def get(self, profile: Profile) -> ServiceProcess:
        if profile.name in self._released:
            raise RuntimeError(f"server profile {profile.name!r} was stopped after its module: a profile that "
                               "several modules share needs scope='session'")
        svc = self._launch(profile)
        if profile.ready:
            svc.wait_ready()  # first: two starts at once would delay the one a test waits for
        upcoming = next((n for n in _FIRST_USE if n not in self._launched), None)
        if upcoming is not None:
            with contextlib.suppress(Exception):  # kept for its own tests (see _launch)
                self._launch(PROFILES[upcoming])
        return svc

    def release(self, profile: Profile) -> None:
        """Its last test has run: asked to stop now (``start_service`` waits for it at the end of the session)."""
        self._released.add(profile.name)
        self._launched[profile.name].terminate()


@pytest.fixture(scope="session")
def servers(start_service, tmp_path_factory) -> Servers:
    return Servers(start_service, tmp_path_factory)


_STARTED_WHILE_COLLECTING: dict[str, ServiceProcess] = {}


def pytest_sessionstart(session) -> None:
    """A run of the whole suite (the configured testpaths, no test chosen by name, mark or earlier failure) starts
    the main server as it begins to collect: every such run needs it first, and collecting takes about as long as
    a start (both mostly one core importing torch)."""
    config, opt = session.config, session.config.option
    chosen = (opt.keyword, opt.markexpr, opt.collectonly, *(getattr(opt, name, None) for name in (
        "lf", "deselect", "showfixtures", "show_fixtures_per_test", "setupplan", "setuponly")))
    if config.args_source != pytest.Config.ArgsSource.TESTPATHS or any(chosen):
        return
    factory = config._tmp_path_factory  # what the tmp_path_factory fixture hands out (fixtures do not exist yet)
    main = PROFILES["main_server"]
    try:
        _STARTED_WHILE_COLLECTING[main.name] = serve(factory, _tiny_checkpoint(factory), **main.settings(factory))
    except Exception as exc:  # noqa: BLE001 - the fixture starts it then, and fails there if it must
        print(f"conftest: the main server did not start while collecting ({exc}); its first test starts it")


def pytest_sessionfinish(session) -> None:
    for svc in _STARTED_WHILE_COLLECTING.values():  # started, and then no selected test asked for it
        svc.stop()


# ---------------------------------------------------------------------------------------------------------------
# slow runs that start with the session
# ---------------------------------------------------------------------------------------------------------------
_SESSION_STARTS: dict[str, Callable[[pytest.FixtureRequest, set[str]], Any]] = {}
_STARTED: dict[str, Any] = {}


def start_with_session(fixture: str):
    """Decorator: ``start(request, tests)`` runs as the session's first test starts, if selected ``tests`` (their
    names) ask for ``fixture``; that fixture reads what it returned with ``started(fixture)``. For runs that cross
    process boundaries and spend most of their time waiting on one core (a Ray cluster, say): started early, they
    use the CPU the tests before theirs leave idle. ``request`` gives session fixtures (``getfixturevalue``)."""
    def register(start):
        _SESSION_STARTS[fixture] = start
        return start
    return register


# A command prefix for such runs: a lower CPU priority, so the tests running meanwhile keep most of the CPU. Not
# Linux's idle class: starved outright while both cores are busy, a Ray node misses its fixed 30 s start-up window.
BACKGROUND = ("nice", "-n", "10")


def to_the_front(pid: int) -> None:
    """``pid`` and its descendants back to normal priority: a test now waits on them."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return
    for proc in procs:
        with contextlib.suppress(OSError, psutil.Error):  # gone, or not ours to raise (not root)
            for thread in proc.threads():  # Linux keeps a nice value per thread
                os.setpriority(os.PRIO_PROCESS, thread.id, 0)


def started(fixture: str) -> Any:
    """What ``fixture``'s start returned (what it raised is raised here, in the tests that asked for it)."""
    value = _STARTED[fixture]
    if isinstance(value, BaseException):
        raise value
    return value


@pytest.fixture(scope="session", autouse=True)
def _session_starts(request) -> None:
    """Runs the starts; each registers the stopping of what it started with ``request.addfinalizer`` (whatever a
    test did not get to stop by the end of the session, a first failure under -x included)."""
    for fixture, start in _SESSION_STARTS.items():
        tests = {item.name for item in request.session.items if fixture in getattr(item, "fixturenames", ())}
        if tests:
            try:
                _STARTED[fixture] = start(request, tests)
            except (Exception, pytest.fail.Exception, pytest.skip.Exception) as exc:  # noqa: BLE001
                _STARTED[fixture] = exc  # the tests that need it fail with it, not every test


def loopback_namespace(*unshare_flags: str) -> tuple[str, ...]:
    """A command prefix: a new network namespace (and whatever else ``unshare_flags`` ask for) with only its loopback
    up, then exec the rest, so the process started is the command's. What runs in it may bind 0.0.0.0, and no other
    machine can reach it or be reached from it."""
    return ("unshare", "--net", *unshare_flags, "sh", "-c", 'ip link set lo up && exec "$0" "$@"')


def can_isolate() -> bool:
    """Whether namespaces of our own can be made here: root, ``unshare`` and ``ip`` (.ci/run installs util-linux and
    iproute2)."""
    import shutil

    return os.geteuid() == 0 and bool(shutil.which("unshare")) and bool(shutil.which("ip"))


def isolated_network() -> tuple[str, ...]:
    """``loopback_namespace()``, or the test skipped where ``can_isolate()`` says no."""
    if not can_isolate():
        pytest.skip("needs root, unshare and ip: a network namespace of its own")
    return loopback_namespace()


main_server = server_fixture(
    "main_server", scope="session", SIGLIP_DTYPE="float32", SIGLIP_ALLOW_PRIVATE_URLS="1",
    doc="The main real server: fp32 (exact parity with the reference), loopback URLs allowed.")


@pytest.fixture(scope="session")
def service(main_server) -> ServiceProcess:
    """``main_server``, under the name most tests use (a module may serve its ``service`` in this process)."""
    return main_server


# ---------------------------------------------------------------------------------------------------------------
# the service in this process
# ---------------------------------------------------------------------------------------------------------------
class InProcessService:
    """The gateway as ``bentoml serve`` builds it (BentoML's app for SiglipGateway: its API routes, this project's
    middlewares and mounted apps), with service.py loaded under the given SIGLIP_* settings, called over an ASGI
    transport; SiglipModel runs as a local dependency (BentoML's in-process mode: no model process, no adaptive
    batcher). No socket, no process: for the request path and the HTTP edge, not for what crosses a process
    boundary (connections, signals, workers), which the ``start_service`` servers test.

    ``client`` is a Starlette TestClient (an httpx.Client): paths relative, as on ``ServiceProcess.client``."""

    _count = itertools.count()

    def __init__(self, env: dict[str, str]):
        import logging

        from starlette.testclient import TestClient

        from siglip import settings as settings_module

        # What ``log()`` reads: the siglip loggers' lines from now on (every in-process service's: they share them).
        self._lines: list[str] = []
        handler = logging.Handler(logging.INFO)
        handler.emit = lambda record: self._lines.append(f"[{record.name}] {record.getMessage()}")
        logging.getLogger("siglip").addHandler(handler)
        self._handler = handler

        self._name = name = f"siglip_test_service_{next(self._count)}"
        spec = importlib.util.spec_from_file_location(name, ROOT / "service.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # pydantic resolves the APIs' annotations through the module
        held = settings_module._settings
        settings_module._settings = settings_module.Settings.from_env(env)  # what service.py's get_settings() reads
        try:
            spec.loader.exec_module(module)
        finally:
            settings_module._settings = held
        self.module, self.settings = module, module.settings
        _forget_bentoml_traffic_metrics()
        self.client = TestClient(module.SiglipGateway.to_asgi(), base_url="http://127.0.0.1:3000")
        self.client.__enter__()  # the lifespan: the gateway's instance, and the model's, whose load starts

    def wait_ready(self, timeout_s: float = 120.0) -> InProcessService:
        """Until the model has loaded (/info answers): the in-process /readyz does not ask the local model."""
        wait_for(lambda: self.client.get("/info").status_code == 200, timeout_s, "in-process model loaded",
                 lambda: self.client.get("/info").text)
        return self

    def post(self, path: str, body=None, **kw) -> httpx.Response:
        return self.client.post(path, json=body, **kw)

    def log(self) -> str:
        """The siglip loggers' lines since this service was built (other in-process services' included)."""
        return "\n".join(self._lines)

    def close(self) -> None:
        import logging

        self.client.__exit__(None, None, None)
        logging.getLogger("siglip").removeHandler(self._handler)
        sys.modules.pop(self._name, None)


def _forget_bentoml_traffic_metrics() -> None:
    """BentoML's traffic middleware registers its metrics in prometheus_client's registry when its app first serves:
    a second app in one process would register them again (DuplicateTimeseries). /metrics reads the multiprocess
    files, not the registry, so unregistering the earlier app's loses nothing."""
    from prometheus_client import REGISTRY

    for collector, names in list(REGISTRY._collector_to_names.items()):  # no public way to list them
        if any(name.startswith("bentoml_") for name in names):
            REGISTRY.unregister(collector)


@pytest.fixture(scope="session")
def in_process(tiny_checkpoint, tmp_path_factory) -> Callable[..., InProcessService]:
    """``in_process(**SIGLIP_env)``: the service in this process (``InProcessService``) with the tiny checkpoint
    and these settings, ready; one per distinct settings, shared for the session."""
    built: dict[tuple, InProcessService] = {}
    # As the real servers: converted models go to the test's own directory, never ~/.cache.
    openvino_cache = str(tmp_path_factory.mktemp("in-process-openvino"))

    def get(**env: str) -> InProcessService:
        env = {"SIGLIP_MODEL": str(tiny_checkpoint), "SIGLIP_OPENVINO_CACHE_DIR": openvino_cache, **env}
        key = tuple(sorted(env.items()))
        if key not in built:
            svc = InProcessService(env)
            try:
                svc.wait_ready()
            except BaseException:
                svc.close()  # its event loop thread would keep the interpreter from exiting
                raise
            built[key] = svc
        return built[key]

    yield get
    for svc in built.values():
        svc.close()


TOKENS = ("tok-alpha-123", "tok-beta-456")


authed = server_fixture(
    "authed", scope="session", SIGLIP_API_TOKEN=",".join(TOKENS), SIGLIP_DTYPE="float32", SIGLIP_DEVICE_DECODE="on",
    doc="""Bearer auth with two tokens, otherwise defaults (private URLs refused), fp32: the server every module that
    checks auth over a real socket shares (security, the Python client, the playground in a browser). JPEGs are
    forwarded to the model service (SIGLIP_DEVICE_DECODE=on): that path's one test across the process boundary.""")


two_workers = server_fixture(
    "two_workers", scope="session", SIGLIP_MODEL_WORKERS="2", SIGLIP_DTYPE="float32", SIGLIP_MAX_CONNECTIONS="50",
    doc="""Two model-service processes (fp32) behind a gateway that takes at most 50 open connections: the
    load-sharing test (test_model_workers) and the connection cap and gateway memory tests (test_hostile).""")


BROKEN = "broken.jpg"  # odd_folder's corrupt file


@pytest.fixture(scope="session")
def odd_folder(tmp_path_factory) -> Path:
    """A few images that need the service's own image code: EXIF-rotated, CMYK, palette, and a corrupt file."""
    from PIL import Image

    root = tmp_path_factory.mktemp("odd")
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    make_image(1, (80, 40)).save(rotated, "JPEG", quality=95, exif=exif)
    (root / "rotated.jpg").write_bytes(rotated.getvalue())
    cmyk = io.BytesIO()
    make_image(2, (60, 60)).convert("CMYK").save(cmyk, "JPEG", quality=95)
    (root / "cmyk.jpg").write_bytes(cmyk.getvalue())
    (root / "palette.png").write_bytes(encode(make_image(3, (50, 70)).convert("P")))
    (root / "plain.png").write_bytes(encode(make_image(4, (64, 48))))
    (root / BROKEN).write_bytes(b"\xff\xd8\xff\xe0 truncated: not really a JPEG")
    return root
