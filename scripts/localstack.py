"""Start the predictor and the transformer on loopback, wait until both are ready, stop them cleanly.

    python -m scripts.localstack up        # runs until Ctrl-C
    python -m scripts.localstack --help

The predictor is the real ``tensorflow/serving`` image when a container engine
answers (docker or podman), otherwise ``python -m model.standin``, which speaks
the same REST API over the same SavedModel folder. Used by the demo, the
benchmark and the integration tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from transformer.helpformat import HelpFormatter

ROOT = Path(__file__).resolve().parent.parent
# TF Serving keeps this many newest versions loaded (manifests/base/models.config says the same), so a
# new version is served beside the previous one and the transformer switches with no gap.
VERSIONS_SERVED = 2


def model_config(name: str, base_path: str, versions: int = VERSIONS_SERVED) -> str:
    """TF Serving's --model_config_file text for one model with the latest ``versions`` versions."""
    return (f'model_config_list {{\n  config {{\n    name: "{name}"\n    base_path: "{base_path}"\n'
            f'    model_platform: "tensorflow"\n'
            f"    model_version_policy {{ latest {{ num_versions: {versions} }} }}\n  }}\n}}\n")


def pinned(name: str) -> str:
    """A value from scripts/versions.env."""
    for line in (ROOT / "scripts" / "versions.env").read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == name:
            return value.strip()
    raise KeyError(f"{name} is not set in scripts/versions.env")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A port found free is bound by the server a moment later, and another process can take it in between
# (TF Serving and KServe's server take a port number, not a bound socket). Their words when that happens:
# uvicorn's "[Errno 98] ... address already in use", gRPC's "Failed to bind", docker's "port is already allocated".
PORT_TAKEN = ("address already in use", "failed to bind", "port is already allocated")
PORT_TRIES = 3  # a port picked here that was taken meanwhile: pick again, this many times in all


def port_taken(log: str) -> bool:
    return any(words in log.lower() for words in PORT_TAKEN)


def container_engine() -> str | None:
    """docker or podman, if one is installed and its engine answers."""
    for engine in ("docker", "podman"):
        if shutil.which(engine):
            probe = subprocess.run([engine, "info"], capture_output=True, timeout=20)
            if probe.returncode == 0:
                return engine
    return None


class StackError(RuntimeError):
    pass


class LocalStack:
    """The predictor and the transformer as child processes on 127.0.0.1."""

    def __init__(
        self,
        build: Path = ROOT / "build",
        model_name: str = "embedder",
        predictor: str = "auto",
        predictor_port: int | None = None,
        predictor_grpc_port: int | None = None,
        transformer_port: int | None = None,
        grpc_port: int | None = None,
        transformer_args: list[str] | None = None,
        log_dir: Path | None = None,
        model_dir: Path | None = None,
    ):
        self.build = Path(build)
        self.model_name = model_name
        self.model_dir = Path(model_dir) if model_dir else self.build / "models" / model_name
        self.predictor_choice = predictor  # auto, container or local
        self.predictor_kind = ""  # what actually runs, once started
        self.predictor_port = predictor_port or free_port()  # TF Serving's REST API
        self.predictor_grpc_port = predictor_grpc_port or free_port()  # TF Serving's gRPC API
        self.transformer_port = transformer_port or free_port()
        self.grpc_port = grpc_port or free_port()  # the transformer's gRPC (v2) port
        # Whose ports were picked here (and may be picked again if taken): never a port the caller chose.
        self._picked = {"predictor": predictor_port is None and predictor_grpc_port is None,
                        "transformer": transformer_port is None and grpc_port is None}
        self.transformer_args = transformer_args or []
        self.log_dir = Path(log_dir) if log_dir else self.build / "logs"
        self.processes: dict[str, subprocess.Popen] = {}
        self._container: tuple[str, str] | None = None

    def another_transformer(self, **options) -> "LocalStack":
        """A stack for one more transformer (``start_transformer()``) on this stack's predictor."""
        options = {"build": self.build, "model_name": self.model_name, **options}
        return LocalStack(predictor_port=self.predictor_port, predictor_grpc_port=self.predictor_grpc_port, **options)

    @property
    def predictor_url(self) -> str:
        return f"http://127.0.0.1:{self.predictor_port}"

    @property
    def transformer_url(self) -> str:
        return f"http://127.0.0.1:{self.transformer_port}"

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{name}.log").open("wb")
        process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.processes[name] = process
        return process

    def _wait(self, name: str, url: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            process = self.processes.get(name)
            if process is not None and process.poll() is not None:
                raise StackError(f"{name} exited with code {process.returncode}:\n{self.log_tail(name)}")
            try:
                response = httpx.get(url, timeout=2.0)
                if ready(response):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise StackError(f"{name} was not ready at {url} within {timeout:.0f}s:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def _start(self, name: str, spawn, url, ready, timeout: float) -> None:
        """Spawn ``name`` and wait until it is ready; if a port picked here was taken meanwhile, pick new
        ones and try again."""
        for attempt in range(1, PORT_TRIES + 1):
            spawn()
            try:
                self._wait(name, url(), ready, timeout)
                return
            except StackError:
                self.stop_process(name)  # not left running when it never became ready
                if not (self._picked[name] and attempt < PORT_TRIES and port_taken(self.log_tail(name))):
                    raise
            if name == "predictor":
                self.predictor_port, self.predictor_grpc_port = free_port(), free_port()
            else:
                self.transformer_port, self.grpc_port = free_port(), free_port()

    def start_predictor(self, timeout: float = 120.0) -> None:
        if not (self.model_dir.is_dir() and any(p.name.isdigit() for p in self.model_dir.iterdir())):
            raise StackError(f"no model versions under {self.model_dir}: run `python -m model.train` first")
        engine = container_engine() if self.predictor_choice in ("auto", "container") else None
        if self.predictor_choice == "container" and engine is None:
            raise StackError("--predictor container: no docker or podman engine answers on this machine")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        config = self.log_dir / "models.config"

        def spawn() -> None:
            if engine:
                image = f"{pinned('TF_SERVING_IMAGE')}:{pinned('TF_SERVING_VERSION')}"
                name = f"embedder-predictor-{self.predictor_port}"
                self._container = (engine, name)
                self.predictor_kind = f"{image} on {engine}"
                config.write_text(model_config(self.model_name, f"/models/{self.model_name}"))
                self._spawn("predictor", [
                    engine, "run", "--rm", "--name", name, "-p", f"127.0.0.1:{self.predictor_port}:8501",
                    "-p", f"127.0.0.1:{self.predictor_grpc_port}:8500",
                    "-v", f"{self.model_dir.resolve()}:/models/{self.model_name}:ro",
                    "-v", f"{config.resolve()}:/config/models.config:ro", image,
                    "--model_config_file=/config/models.config",
                ])
            else:
                self.predictor_kind = "python -m model.standin"
                config.write_text(model_config(self.model_name, str(self.model_dir.resolve())))
                self._spawn("predictor", [
                    sys.executable, "-m", "model.standin", "--model_config_file", str(config),
                    "--rest_api_port", str(self.predictor_port), "--port", str(self.predictor_grpc_port),
                ])

        def available(response: httpx.Response) -> bool:
            if response.status_code != 200:
                return False
            states = [s.get("state") for s in response.json().get("model_version_status", [])]
            return "AVAILABLE" in states

        self._start("predictor", spawn, lambda: f"{self.predictor_url}/v1/models/{self.model_name}", available,
                    timeout)

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def transformer_command(self, model_dir: Path | None = None) -> list[str]:
        """``python -m transformer`` against this stack's predictor, on this stack's REST and gRPC ports."""
        return [
            sys.executable, "-m", "transformer", "--model_name", self.model_name,
            "--predictor_host", f"127.0.0.1:{self.predictor_port}", "--predictor_grpc_port", str(self.predictor_grpc_port),
            "--model_base_path", str(model_dir or self.model_dir),
            "--http_port", str(self.transformer_port), "--grpc_port", str(self.grpc_port),
            "--enable_latency_logging", "false", *self.transformer_args,
        ]

    def start_transformer(self, timeout: float = 60.0) -> None:
        self._start("transformer", lambda: self._spawn("transformer", self.transformer_command()),
                    lambda: f"{self.transformer_url}/v1/models/{self.model_name}", lambda r: r.status_code == 200,
                    timeout)

    def start(self) -> "LocalStack":
        try:
            self.start_predictor()
            self.start_transformer()
        except BaseException:
            self.stop()
            raise
        return self

    def stop_process(self, name: str, timeout: float = 15.0) -> None:
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        if name == "predictor" and self._container:
            subprocess.run([self._container[0], "stop", "-t", "5", self._container[1]], capture_output=True)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop(self) -> None:
        for name in ("transformer", "predictor"):
            self.stop_process(name)

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.localstack", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter,
                                     epilog="Logs: build/logs/ (predictor.log, transformer.log).")
    parser.add_argument("command", choices=["up"], help="up: start both and keep them running until Ctrl-C")
    parser.add_argument("--build", type=Path, default=ROOT / "build", help="build folder written by model.train")
    parser.add_argument("--model-name", default="embedder", help="the model's folder under build/models/ and its "
                        "name on both servers")
    parser.add_argument("--predictor", choices=["auto", "container", "local"], default="auto",
                        help="container: the tensorflow/serving image; local: python -m model.standin")
    parser.add_argument("--predictor-port", type=int, default=8501, help="TF Serving's REST port")
    parser.add_argument("--predictor-grpc-port", type=int, default=8500,
                        help="TF Serving's gRPC port (the transformer's default way to call it)")
    parser.add_argument("--transformer-port", type=int, default=8080, help="the transformer's REST port")
    parser.add_argument("--grpc-port", type=int, default=8081, help="the transformer's gRPC (v2) port")
    args = parser.parse_args(argv)
    stack = LocalStack(build=args.build, model_name=args.model_name, predictor=args.predictor,
                       predictor_port=args.predictor_port, predictor_grpc_port=args.predictor_grpc_port,
                       transformer_port=args.transformer_port,
                       grpc_port=args.grpc_port)
    try:
        stack.start()
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"predictor   {stack.predictor_url}/v1/models/{args.model_name} (REST), "
          f"127.0.0.1:{stack.predictor_grpc_port} (gRPC)")
    print(f"transformer {stack.transformer_url}/v1/models/{args.model_name}:predict (v1 REST), "
          f"{stack.transformer_url}/v2/models/{args.model_name}/infer (v2 REST), {stack.grpc_target} (v2 gRPC)")
    print("Ctrl-C stops both.")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
