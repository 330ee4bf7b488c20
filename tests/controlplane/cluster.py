"""Start the control plane on loopback and install KServe into it, as ``scripts/kind-up.sh`` does on kind.

    with ControlPlane.start(work_dir) as cp:      # etcd, kube-apiserver, controller-manager, scheduler, KWOK,
        cp.kubectl("apply", "-k", overlay)        # KServe's controller manager with its webhooks
        ...                                       # cp.env: KUBECONFIG for the project's own commands

What it installs comes from KServe's module at the tested version: ``config/overlays/all`` (what KServe's release
``kserve.yaml`` is built from) with its Deployments, Services and cert-manager objects left out, since the
controller runs here as a process, and its webhooks pointed at that process's loopback port with our own CA; then
``config/runtimes`` (the ClusterServingRuntimes of ``kserve-cluster-resources.yaml``), admitted by KServe's own
webhook, and the ``deploy`` setting kind-up.sh patches. The LLM and local-model controllers are not run: their
webhooks and conversion hooks are dropped with them.

KWOK plays one node. Pods are scheduled onto it, marked Running and Ready at once: no container runs. A pod whose
``embedder.example.com/model-store`` annotation is ``NEVER_READY_VERSION`` stays Running and never turns Ready, as
the pods of a version whose containers fail their readiness probe would.
"""

from __future__ import annotations

import base64
import copy
import datetime
import ipaddress
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from tests.controlplane.build import BIN, Versions, module_dir

NEVER_READY_VERSION = "97"
MODEL_STORE_ANNOTATION = "embedder.example.com/model-store"
KSERVE_WEBHOOK_SERVICE = "kserve-webhook-server-service"
NODE = "kwok-node-0"
# The Service IP range the API server allocates from: addresses written into Service objects, never dialled
# (no kube-proxy runs here, and nothing in these tests connects to a Service).
SERVICE_RANGE = "10.96.0.0/16"


class ControlPlaneFailed(RuntimeError):
    """A process did not start or an install step failed (the message names the log to read)."""


def free_port() -> int:
    from scripts.localstack import free_port as pick

    return pick()


# --- certificates ---------------------------------------------------------------------------------------------

def write_certificates(folder: Path) -> dict[str, Path]:
    """A CA, a serving certificate for 127.0.0.1 (the API server and KServe's webhooks), the service-account key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def key():
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def pem_key(k):
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                               serialization.NoEncryption())

    ca_key = key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "embedder-test-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          # What a strict verifier asks of a CA (Python 3.13's default context is X509_STRICT): its use and ids.
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    serving_key = key()
    serving = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
               .issuer_name(ca_name).public_key(serving_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                           x509.DNSName("localhost")]), critical=False)
               # Python 3.13 verifies strictly: a leaf without the Authority Key Identifier of its CA is refused
               # ("Missing Authority Key Identifier"), which every API call of the kubernetes client then was.
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(serving_key.public_key()), critical=False)
               .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                     x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
               .sign(ca_key, hashes.SHA256()))
    sa_key = key()
    paths = {"ca": folder / "ca.crt", "cert": folder / "serving.crt", "key": folder / "serving.key",
             "sa_key": folder / "sa.key", "sa_pub": folder / "sa.pub"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(serving.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(pem_key(serving_key))
    paths["sa_key"].write_bytes(pem_key(sa_key))
    paths["sa_pub"].write_bytes(sa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return paths


# --- KServe's install manifests, adapted to a controller on loopback -------------------------------------------

def kustomize(folder: Path) -> list[dict]:
    done = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        raise ControlPlaneFailed(f"kubectl kustomize {folder} failed: {done.stderr.strip()[-500:]}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


# What the release runs in pods, and cert-manager's objects: the controller runs here as a process instead.
LEFT_OUT = {"Namespace", "Deployment", "DaemonSet", "Service", "Certificate", "Issuer", "Secret"}


def kserve_install(kserve: Path, webhook_port: int, ca_pem: bytes) -> tuple[list[dict], list[dict]]:
    """(the objects to apply before the controller starts, its webhook configurations) from KServe's module."""
    before, webhooks = [], []
    ca_bundle = base64.b64encode(ca_pem).decode()
    for doc in kustomize(kserve / "config" / "overlays" / "all"):
        kind = doc["kind"]
        if kind in LEFT_OUT:
            continue
        if kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
            served = []
            for hook in doc["webhooks"]:
                service = hook["clientConfig"].get("service") or {}
                if service.get("name") != KSERVE_WEBHOOK_SERVICE:
                    continue  # the LLM and local-model controllers' hooks: not run here
                hook = copy.deepcopy(hook)
                hook["clientConfig"] = {"url": f"https://127.0.0.1:{webhook_port}{service.get('path', '/')}",
                                        "caBundle": ca_bundle}
                served.append(hook)
            if served:
                doc = copy.deepcopy(doc)
                doc["webhooks"] = served
                (doc.get("metadata") or {}).get("annotations", {}).pop("cert-manager.io/inject-ca-from", None)
                webhooks.append(doc)
            continue
        if kind == "CustomResourceDefinition":
            doc = copy.deepcopy(doc)
            if (doc["spec"].get("conversion") or {}).get("strategy") == "Webhook":
                doc["spec"]["conversion"] = {"strategy": "None"}  # served by the LLM controller, not run here
            (doc.get("metadata") or {}).get("annotations", {}).pop("cert-manager.io/inject-ca-from", None)
        before.append(doc)
    return before, webhooks


# --- KWOK's stages ---------------------------------------------------------------------------------------------

def kwok_stages(kwok: Path) -> list[dict]:
    """KWOK's own fast pod stages, but pods of NEVER_READY_VERSION run un-Ready (a stage of their own)."""
    stage_dir = kwok / "kustomize" / "stage" / "pod" / "fast"
    stages = {name: yaml.safe_load((stage_dir / f"{name}.yaml").read_text())
              for name in ("pod-ready", "pod-complete", "pod-delete")}
    never = {"key": f'.metadata.annotations["{MODEL_STORE_ANNOTATION}"]', "operator": "In",
             "values": [NEVER_READY_VERSION]}
    ready = stages["pod-ready"]
    unready = copy.deepcopy(ready)
    ready["spec"]["selector"]["matchExpressions"].append({**never, "operator": "NotIn"})
    unready["metadata"]["name"] = "pod-running-unready"
    unready["spec"]["selector"]["matchExpressions"].append(never)
    template = unready["spec"]["next"]["statusTemplate"]
    for pattern, now in ((r'status: "True"(\s+)type: Ready\b', r'status: "False"\1type: Ready'),
                         (r'status: "True"(\s+)type: ContainersReady', r'status: "False"\1type: ContainersReady'),
                         # the first is the containers' (the second, init containers', stays: they finished)
                         (r"ready: true", "ready: false")):
        template, count = re.subn(pattern, now, template, count=1)
        if count != 1:
            raise ControlPlaneFailed(f"KWOK's pod-ready stage changed shape: {pattern!r} found {count} times in "
                                     f"{stage_dir}/pod-ready.yaml")
    unready["spec"]["next"]["statusTemplate"] = template
    return [ready, unready, stages["pod-complete"], stages["pod-delete"]]


# --- the processes -----------------------------------------------------------------------------------------------

class ControlPlane:
    """The running control plane; ``stop()`` (or leaving the ``with``) ends every process."""

    def __init__(self, work: Path, apiserver_args: tuple[str, ...] = (), users: tuple[tuple[str, str], ...] = (),
                 kwok: bool = True):
        self.work = work
        self.apiserver_args = tuple(apiserver_args)
        self.users = tuple(users)  # (user, groups) that get a token of their own, for processes outside
        self.tokens: dict[str, str] = {}
        self.with_kwok = kwok
        self.logs = work / "logs"
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.kubeconfig = work / "kubeconfig"
        # The kubectl of the same release first on PATH, for the harness and the project's commands alike: the
        # machine's may be any minor (1.32 here), beyond the one minor of skew kubectl supports.
        self.env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
        self.timings: list[tuple[str, float]] = []

    # Starting -----------------------------------------------------------------------------------------------
    @classmethod
    def start(cls, work: Path, say=print, **options) -> "ControlPlane":
        """Start it all; ``options``: ``apiserver_args`` added to the API server's, ``users`` given tokens (a real
        node's kubelet, its kube-proxy), ``kwok=False`` for no KWOK node."""
        cp = cls(work, **options)
        try:
            cp._start(say)
        except BaseException:
            cp.stop()
            raise
        return cp

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def _run(self, name: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "w")
        process = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=log, stderr=subprocess.STDOUT,
                                   env=env or self.env, start_new_session=True)
        log.close()
        self.processes.append((name, process))
        return process

    def _wait(self, name: str, ready, timeout: float = 120.0) -> None:
        process = dict(self.processes)[name]
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise ControlPlaneFailed(f"{name} exited with {process.returncode}: "
                                         f"{self.tail(name)} (log: {self.logs / name}.log)")
            try:
                if ready():
                    return
            except (httpx.HTTPError, OSError, subprocess.SubprocessError):
                pass
            if time.monotonic() > deadline:
                raise ControlPlaneFailed(f"{name} not ready after {timeout:.0f}s: {self.tail(name)} "
                                         f"(log: {self.logs / name}.log)")
            time.sleep(0.2)

    def tail(self, name: str, lines: int = 5) -> str:
        try:
            return " | ".join((self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _timed(self, what: str, began: float, say) -> None:
        self.timings.append((what, time.monotonic() - began))
        say(f"  {what}: {self.timings[-1][1]:.1f}s")

    def _start(self, say) -> None:
        versions = Versions.pinned()
        certs = write_certificates(self.work / "pki")
        def new_token() -> str:
            return base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")

        token = new_token()
        lines = [f"{token},admin,admin,system:masters"]
        for user, groups in self.users:
            self.tokens[user] = new_token()
            lines.append(f'{self.tokens[user]},{user},{user},"{groups}"')
        (self.work / "tokens.csv").write_text("\n".join(lines) + "\n")
        self.certs = certs
        began = time.monotonic()

        etcd_port, etcd_peer, api_port = free_port(), free_port(), free_port()
        self._run("etcd", ["etcd", f"--data-dir={self.work / 'etcd'}", "--name=default",
                           f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                           f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                           f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
                           f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
                           f"--initial-cluster=default=http://127.0.0.1:{etcd_peer}",
                           "--unsafe-no-fsync", "--log-level=warn"])
        self._wait("etcd", lambda: httpx.get(f"http://127.0.0.1:{etcd_port}/health", timeout=1).status_code == 200)

        self._run("kube-apiserver", [
            "kube-apiserver", f"--etcd-servers=http://127.0.0.1:{etcd_port}", "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1", f"--secure-port={api_port}", f"--tls-cert-file={certs['cert']}",
            f"--tls-private-key-file={certs['key']}", f"--client-ca-file={certs['ca']}",
            f"--token-auth-file={self.work / 'tokens.csv'}", "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={certs['sa_pub']}", f"--service-account-signing-key-file={certs['sa_key']}",
            f"--service-cluster-ip-range={SERVICE_RANGE}", "--allow-privileged=true", "--profiling=false",
            f"--cert-dir={self.work / 'pki'}", "--v=1", *self.apiserver_args])
        self.server = f"https://127.0.0.1:{api_port}"
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "controlplane",
            "clusters": [{"name": "controlplane", "cluster": {"server": self.server,
                                                              "certificate-authority": str(certs["ca"])}}],
            "users": [{"name": "admin", "user": {"token": token}}],
            "contexts": [{"name": "controlplane", "context": {"cluster": "controlplane", "user": "admin"}}]}))
        self._wait("kube-apiserver", lambda: self.kubectl("get", "--raw", "/readyz", check=False).returncode == 0)
        self._timed(f"etcd and kube-apiserver {versions.kubernetes} ready", began, say)

        began = time.monotonic()
        self._run("kube-controller-manager", [
            "kube-controller-manager", f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
            f"--service-account-private-key-file={certs['sa_key']}", f"--root-ca-file={certs['ca']}",
            "--use-service-account-credentials=false", "--secure-port=0", "--v=1"])
        self._run("kube-scheduler", ["kube-scheduler", f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
                                     "--secure-port=0", "--v=1"])
        if self.with_kwok:
            kwok = module_dir("sigs.k8s.io/kwok", versions.kwok, open(os.devnull, "w"))
            stages = self.work / "kwok-stages.yaml"
            stages.write_text(yaml.safe_dump_all(kwok_stages(kwok)))
            self._run("kwok", ["kwok", f"--kubeconfig={self.kubeconfig}", f"--config={stages}",
                               "--manage-all-nodes=false",
                               "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                               f"--server-address=127.0.0.1:{free_port()}", "--node-lease-duration-seconds=40"])
            self.apply([{"apiVersion": "v1", "kind": "Node", "metadata": {
                "name": NODE, "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {"kubernetes.io/hostname": NODE, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                           "type": "kwok"}},
                "status": {"allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110"},
                           "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110"}}}])
            self._wait("kwok", lambda: self.node_ready())
        self._wait("kube-controller-manager", lambda: self.kubectl(
            "-n", "default", "get", "serviceaccount", "default", check=False).returncode == 0)
        self._timed("controller-manager and scheduler" + (" and a KWOK node" if self.with_kwok else "") + " ready",
                    began, say)

        began = time.monotonic()
        kserve = module_dir("github.com/kserve/kserve", versions.kserve, open(os.devnull, "w"))
        webhook_port, probe_port = free_port(), free_port()
        before, webhooks = kserve_install(kserve, webhook_port, certs["ca"].read_bytes())
        self.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kserve"}}])
        crds = [doc for doc in before if doc["kind"] == "CustomResourceDefinition"]
        self.apply(crds)
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
        self.apply([doc for doc in before if doc["kind"] != "CustomResourceDefinition"])
        # kind-up.sh's one change to KServe's shipped settings: Standard (raw Deployment) mode by default.
        self.kubectl("-n", "kserve", "patch", "configmap", "inferenceservice-config", "--type", "merge",
                     "-p", json.dumps({"data": {"deploy": json.dumps({"defaultDeploymentMode": "Standard"})}}))
        # controller-runtime reads the webhook's serving pair from $TMPDIR/k8s-webhook-server/serving-certs.
        tmp = self.work / "tmp"
        serving_certs = tmp / "k8s-webhook-server" / "serving-certs"
        serving_certs.mkdir(parents=True, exist_ok=True)
        (serving_certs / "tls.crt").write_bytes(certs["cert"].read_bytes())
        (serving_certs / "tls.key").write_bytes(certs["key"].read_bytes())
        # The controller runs as its own ServiceAccount, bound by KServe's own ClusterRole and Roles (applied above
        # from its release manifests), as its pod would: a permission they miss fails here as on a cluster.
        manager = self.work / "kserve-manager.kubeconfig"
        manager.write_text(self.kubeconfig_for(self.service_account_token("kserve", "kserve-controller-manager")))
        self._run("kserve-manager", ["kserve-manager", "--metrics-addr=0", f"--webhook-port={webhook_port}",
                                     f"--health-probe-addr=127.0.0.1:{probe_port}"],
                  env={**self.env, "POD_NAMESPACE": "kserve", "TMPDIR": str(tmp), "KUBECONFIG": str(manager)})
        self._wait("kserve-manager",
                   lambda: httpx.get(f"http://127.0.0.1:{probe_port}/readyz", timeout=1).status_code == 200)
        self.apply(webhooks)
        runtimes = kustomize(kserve / "config" / "runtimes")
        # The API server may take a moment to trust a webhook configuration it was just given: retry the first use.
        self._wait("kserve-manager", lambda: self.apply(runtimes, check=False).returncode == 0, timeout=60)
        self._timed(f"KServe {versions.kserve} controller, webhooks and {len(runtimes)} serving runtimes installed",
                    began, say)

    def service_account_token(self, namespace: str, name: str) -> str:
        return self.kubectl("-n", namespace, "create", "token", name, "--duration=48h").stdout.strip()

    def kubeconfig_for(self, token: str, server: str | None = None) -> str:
        """A kubeconfig that talks to the API server (or ``server``, a relay of it) with ``token``."""
        return yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "controlplane",
            "clusters": [{"name": "controlplane", "cluster": {"server": server or self.server,
                                                              "certificate-authority": str(self.certs["ca"])}}],
            "users": [{"name": "user", "user": {"token": token}}],
            "contexts": [{"name": "controlplane", "context": {"cluster": "controlplane", "user": "user"}}]})

    # Using it -------------------------------------------------------------------------------------------------
    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run(["kubectl", *args], capture_output=True, text=True, env=self.env, input=input,
                              timeout=120)
        if check and done.returncode != 0:
            raise ControlPlaneFailed(f"kubectl {' '.join(args)} failed: {done.stderr.strip()[-800:]}")
        return done

    def apply(self, docs: list[dict], check: bool = True) -> subprocess.CompletedProcess:
        return self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                            input=yaml.safe_dump_all(docs), check=check)

    def get(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def node_ready(self, node: str = NODE) -> bool:
        done = self.kubectl("get", "node", node, "-o", "json", check=False)
        if done.returncode != 0:
            return False
        conditions = {c["type"]: c["status"] for c in json.loads(done.stdout).get("status", {}).get("conditions", [])}
        return conditions.get("Ready") == "True"

    # Stopping -------------------------------------------------------------------------------------------------
    def stop(self) -> None:
        stop_processes(self.processes)


def stop_processes(processes: list[tuple[str, subprocess.Popen]], timeout: float = 15) -> None:
    """SIGTERM to each process group, the last started first; SIGKILL to those still there after ``timeout``."""
    for name, process in reversed(processes):
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for name, process in reversed(processes):
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    processes.clear()
