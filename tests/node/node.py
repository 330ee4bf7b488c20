"""A real Kubernetes node beside the control plane: containers of the project's own images run on it.

    with ControlPlane.start(work, **node_options(work)) as cp, Node.start(cp, work, store) as node:
        node.load(images)                     # what `kind load` does: ctr images import
        ...                                   # the project's commands, with cp.env's KUBECONFIG

The node lives in a network namespace of its own (``ip netns add``), so no address but loopback is added to the
machine's: a veth pair inside it holds the node's address, the CNI ``bridge`` plugin puts pods on ``cni0`` beside it,
kube-proxy's iptables rules give Services their addresses inside it, and CoreDNS (built from its module) answers
``*.svc.cluster.local`` for the pods. ``tests.node.bridge`` joins it to the control plane on the machine's
loopback both ways. Processes of the node (containerd, the kubelet) also share one mount namespace, where
``/mnt/embedder-build`` is the test's model store, as ``scripts/kind-up.sh`` mounts the host's ``build/`` into
the kind node: the kind overlay's hostPath volume is used as it is.

What it took on this machine (cgroup v1, no CAP_SYS_RESOURCE), from ``DESIGN.md``'s probe: the kubelet told
``failCgroupV1: false`` and the cgroupfs driver without QoS cgroups, containerd's CRI told
``restrict_oom_score_adj``, a pause image built from Kubernetes' own source, every folder under the test's own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.controlplane.build import BIN
from tests.controlplane.cluster import stop_processes
from tests.node.images import PAUSE

NODE_NAME = "embedder-node"
NODE_IP = "10.250.0.2"
POD_CIDR = "10.244.0.0/24"
CLUSTER_CIDR = "10.244.0.0/16"
API_IN_NODE = "127.0.0.1:6443"  # where the node's processes reach the API server (tests.node.bridge)
KIND_MOUNT = "/mnt/embedder-build"  # where scripts/kind-up.sh mounts build/ into the kind node
USERS = ((f"system:node:{NODE_NAME}", "system:nodes"), ("system:kube-proxy", "system:node-proxier"),
         ("system:coredns", "embedder:coredns"))


class NodeUnavailable(RuntimeError):
    """Containers cannot run on this machine (the message says what is missing)."""


class NodeFailed(RuntimeError):
    """A part of the node did not start or a pod did not run (the message names the log)."""


def missing() -> str:
    """Why a real node cannot run here ("" when it can)."""
    if os.geteuid() != 0:
        return "a real node needs root (network namespaces, mounts, containers)"
    tools = [t for t in ("containerd", "runc", "ctr", "ip", "iptables", "nsenter", "unshare") if not shutil.which(t)]
    if not Path("/usr/lib/cni/bridge").exists():
        tools.append("the CNI plugins (/usr/lib/cni)")
    if tools:
        return (f"{', '.join(tools)} not installed (Debian: apt-get install containerd runc "
                "containernetworking-plugins iptables iproute2 util-linux)")
    return ""


def node_options(work: Path) -> dict:
    """What the control plane needs for a real node: the egress selector through the bridge, the node's users."""
    egress = work / "egress.yaml"
    egress.write_text(yaml.safe_dump({
        "apiVersion": "apiserver.k8s.io/v1beta1", "kind": "EgressSelectorConfiguration",
        "egressSelections": [{"name": "cluster", "connection": {
            "proxyProtocol": "HTTPConnect", "transport": {"uds": {"udsName": str(work / "egress.sock")}}}}]}))
    # InternalIP first, as kubeadm sets it: the node's name resolves nowhere, its address in the node's namespace.
    return {"apiserver_args": (f"--egress-selector-config-file={egress}",
                               "--kubelet-preferred-address-types=InternalIP,Hostname"),
            "users": USERS, "kwok": False}


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise NodeFailed(f"{' '.join(args)} failed: {done.stderr.strip()[-500:]}")
    return done


class Node:
    def __init__(self, cp, work: Path, store: Path):
        self.cp = cp
        self.work = work
        self.store = store
        self.netns = f"embedder-node-{os.getpid()}"
        self.logs = work / "logs"
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.socket = work / "containerd" / "containerd.sock"

    @classmethod
    def start(cls, cp, work: Path, store: Path, say=print) -> "Node":
        why = missing()
        if why:
            raise NodeUnavailable(why)
        node = cls(cp, work, store)
        try:
            node._start(say)
        except BaseException:
            node.stop()
            raise
        return node

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- processes --------------------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "w") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                       env={**os.environ, "PATH": f"/usr/lib/cni:{os.environ.get('PATH', '')}"})
        self.processes.append((name, process))
        return process

    def in_node(self, *argv: str, mount: bool = False) -> list[str]:
        """A command line run in the node's network namespace (and its mount namespace, with ``mount``)."""
        if mount:
            return ["nsenter", f"--target={self._mounts}", "--mount", "--net", "--", *argv]
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv]

    def tail(self, name: str, lines: int = 8) -> str:
        try:
            return " | ".join((self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _wait(self, name: str, ready, timeout: float = 90.0) -> None:
        process = dict(self.processes).get(name)
        deadline = time.monotonic() + timeout
        while not ready():
            if process is not None and process.poll() is not None:
                raise NodeFailed(f"{name} exited with {process.returncode}: {self.tail(name)} "
                                 f"(log: {self.logs / name}.log)")
            if time.monotonic() > deadline:
                raise NodeFailed(f"{name} not ready after {timeout:.0f}s: {self.tail(name)} "
                                 f"(log: {self.logs / name}.log)")
            time.sleep(0.3)

    # -- start-up ---------------------------------------------------------------------------------------------

    def _start(self, say) -> None:
        began = time.monotonic()
        self._network()
        self._spawn("bridge", [sys.executable, "-m", "tests.node.bridge", "--netns", self.netns,
                               "--api", self.cp.server.removeprefix("https://"), "--listen", API_IN_NODE,
                               "--egress", str(self.work / "egress.sock")])
        self._wait("bridge", lambda: (self.work / "egress.sock").exists())
        self._containerd()
        self._kubelet()
        self._kube_proxy()
        self._coredns()
        say(f"  a real node ({NODE_NAME}: containerd, kubelet, kube-proxy, CoreDNS) ready: "
            f"{time.monotonic() - began:.1f}s")

    def _network(self) -> None:
        # A node of a run that was killed before its teardown leaves its namespace behind: its pid is gone.
        for line in run("ip", "netns", "list", check=False).stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            pid = name.removeprefix("embedder-node-")
            if name.startswith("embedder-node-") and pid.isdigit() and not Path(f"/proc/{pid}").exists():
                run("ip", "netns", "delete", name, check=False)
        run("ip", "netns", "add", self.netns)
        ns = ["ip", "-n", self.netns]
        run(*ns, "link", "set", "lo", "up")
        # The node's address on a veth pair with both ends inside (this kernel has no dummy interfaces).
        run(*ns, "link", "add", "node0", "type", "veth", "peer", "name", "node1")
        run(*ns, "addr", "add", f"{NODE_IP}/32", "dev", "node0")
        run(*ns, "link", "set", "node1", "up")
        run(*ns, "link", "set", "node0", "up")
        # kube-proxy and the kubelet look for a default route to tell the node's address; nothing leaves by it.
        run(*ns, "route", "add", "default", "dev", "node0")

    def kubeconfig(self, user: str) -> Path:
        path = self.work / f"{user.replace(':', '-')}.kubeconfig"
        path.write_text(self.cp.kubeconfig_for(self.cp.tokens[user], f"https://{API_IN_NODE}"))
        return path

    def _containerd(self) -> None:
        root = self.work / "containerd"
        cni = self.work / "cni"
        (cni / "net.d").mkdir(parents=True, exist_ok=True)
        (cni / "net.d" / "10-embedder.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "embedder-pods", "plugins": [
                {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": True, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]], "routes": [{"dst": "0.0.0.0/0"}],
                          "dataDir": str(cni / "ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}}]}))
        config = root / "config.toml"
        root.mkdir(parents=True, exist_ok=True)
        config.write_text(f"""version = 2
root = "{root / 'root'}"
state = "{root / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{root / 'opt'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE}"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni / 'net.d'}"
""")
        # One mount namespace for the node: the kind node's /mnt/embedder-build is the test's store, and the pods'
        # network namespaces are not listed among the machine's (a tmpfs over /run/netns, in here only).
        setup = (f"mount --make-rprivate / && mount -t tmpfs embedder-node /mnt && mkdir -p {KIND_MOUNT} && "
                 f"mount --bind {self.store} {KIND_MOUNT} && mount -t tmpfs embedder-netns /run/netns && "
                 f"exec containerd --config {config}")
        process = self._spawn("containerd", self.in_node("unshare", "--mount", "--", "sh", "-c", setup))
        self._mounts = process.pid
        self._wait("containerd", lambda: self.socket.exists() and self.ctr("version", check=False).returncode == 0)

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run("ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args, check=check)

    def _kubelet(self) -> None:
        root = self.work / "kubelet"
        root.mkdir(parents=True, exist_ok=True)
        resolv = self.work / "resolv.conf"
        resolv.write_text(f"nameserver {NODE_IP}\n")
        config = self.work / "kubelet.yaml"
        config.write_text(yaml.safe_dump({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            # This machine: cgroup v1 (a 1.35 kubelet refuses it unless told), no systemd, no CAP_SYS_RESOURCE.
            "failCgroupV1": False, "cgroupDriver": "cgroupfs", "cgroupsPerQOS": False, "enforceNodeAllocatable": [],
            "evictionHard": {}, "localStorageCapacityIsolation": False, "failSwapOn": False,
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "containerRuntimeEndpoint": f"unix://{self.socket}", "address": NODE_IP, "port": 10250,
            "readOnlyPort": 0, "healthzBindAddress": "127.0.0.1", "healthzPort": 10248,
            "podLogsDir": str(self.work / "pod-logs"), "resolvConf": str(resolv),
            "clusterDNS": [NODE_IP], "clusterDomain": "cluster.local",
            # Reached only through the API server's egress (tests.node.bridge): the kubelet trusts its callers.
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "serializeImagePulls": False, "registerNode": True, "maxPods": 30,
            "nodeStatusReportFrequency": "10s", "syncFrequency": "10s",
        }))
        self._spawn("kubelet", self.in_node(
            str(BIN / "kubelet"), f"--config={config}", f"--kubeconfig={self.kubeconfig(USERS[0][0])}",
            f"--root-dir={root}", f"--cert-dir={root / 'pki'}", f"--hostname-override={NODE_NAME}",
            f"--node-ip={NODE_IP}", "--v=1", mount=True))
        self._wait("kubelet", self.ready, timeout=120)

    def ready(self) -> bool:
        return self.cp.node_ready(NODE_NAME)

    def _kube_proxy(self) -> None:
        config = self.work / "kube-proxy.yaml"
        config.write_text(yaml.safe_dump({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.kubeconfig(USERS[1][0]))},
            "mode": "iptables", "clusterCIDR": CLUSTER_CIDR, "hostnameOverride": NODE_NAME,
            "healthzBindAddress": "127.0.0.1:10256", "metricsBindAddress": "127.0.0.1:10249",
            # 0: leave the machine's conntrack settings alone (they are not the node's namespace's to change).
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            # A pod calling a Service served by a pod on the same bridge: masqueraded, so the answer comes back
            # through the rules that translated the call.
            "iptables": {"masqueradeAll": True},
        }))
        self._spawn("kube-proxy", self.in_node(str(BIN / "kube-proxy"), f"--config={config}", "--v=1"))
        self._wait("kube-proxy", lambda: run(*self.in_node("curl", "-sf", "http://127.0.0.1:10256/healthz"),
                                             check=False).returncode == 0, timeout=60)

    def _coredns(self) -> None:
        from tests.node.coredns import build as build_coredns

        binary = build_coredns()
        self.cp.apply([
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "embedder:coredns"},
             "rules": [{"apiGroups": [""], "resources": ["services", "pods", "namespaces"], "verbs": ["list", "watch"]},
                       {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": {"name": "embedder:coredns"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "embedder:coredns"},
             "subjects": [{"kind": "Group", "name": "embedder:coredns", "apiGroup": "rbac.authorization.k8s.io"}]}])
        corefile = self.work / "Corefile"
        corefile.write_text(f""".:53 {{
    bind {NODE_IP}
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {self.kubeconfig(USERS[2][0])} controlplane
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
""")
        self._spawn("coredns", self.in_node(str(binary), "-conf", str(corefile)))
        self._wait("coredns", lambda: "plugin/kubernetes" not in self.tail("coredns", 2)
                   and ":53" in self.tail("coredns", 20), timeout=60)

    # -- using it ---------------------------------------------------------------------------------------------

    def load(self, archives: list[Path]) -> None:
        """Import image archives into the node's containerd, as ``kind load image-archive`` does."""
        for archive in archives:
            self.ctr("images", "import", "--all-platforms", "--digests", str(archive))

    def http(self, url: str, *curl: str) -> subprocess.CompletedProcess:
        """curl run inside the node's namespace, where pods and Services have their addresses."""
        return run(*self.in_node("curl", "-s", "--max-time", "10", *curl, url), check=False)

    # -- stopping ---------------------------------------------------------------------------------------------

    def stop(self) -> None:
        # The pods' containers first: their shims outlive containerd.
        if self.socket.exists():
            for task in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
                self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
        stop_processes(self.processes, timeout=20)
        subprocess.run(["pkill", "-KILL", "-f", f"containerd-shim.*{self.socket}"], capture_output=True)
        subprocess.run(["ip", "netns", "delete", self.netns], capture_output=True)
