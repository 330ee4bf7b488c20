// CoreDNS with only the plugins the test node's Corefile names (tests/node/node.py), built from CoreDNS's own
// module by tests/node/coredns.py. CoreDNS's own main imports every plugin it ships, cloud DNS providers included;
// this one is its documented way to build a smaller server: the same coremain, a shorter directive list.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
)

// In the order of CoreDNS's plugin.cfg: the order a query meets them.
var directives = []string{"bind", "errors", "log", "cache", "kubernetes"}

func init() {
	dnsserver.Directives = directives
}

func main() {
	coremain.Run()
}
