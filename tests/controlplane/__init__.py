"""A real Kubernetes control plane with KServe's own controller, on loopback, for the cluster tests.

``build``: etcd, kube-apiserver, kube-controller-manager and kube-scheduler (``k8s.io/kubernetes``), KWOK
(``sigs.k8s.io/kwok``) and KServe's controller manager (``github.com/kserve/kserve/cmd/manager``), compiled once
from the Go module proxy into ``build/controlplane/bin``. ``cluster``: the processes started and KServe's install
manifests (taken from its module, never copied into this repository) applied. Nothing runs containers: KWOK plays
the node, so pods are scheduled, "run" and turn Ready without any; what that cannot show is listed in
``manifests/README.md``.
"""
