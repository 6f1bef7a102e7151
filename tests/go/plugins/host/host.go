// host loads a Go plugin (tests/go/plugins/holder, built with -buildmode=plugin) with
// plugin.Open and makes its code register heap defers, next to its own. (No main.go here:
// plugins need cgo, which `cargo xtask go-programs` builds without; the e2e test builds this.)
//
// After opening the plugin it waits -delay (a tracer may find and probe the plugin meanwhile),
// then: -churn C calls of the plugin's Churn, each registering and running -n defers in one
// frame; -host H goroutines holding -n heap defers each in the host's own code (main.hold);
// -plugin-goroutines P goroutines holding -n heap defers each in the plugin's Hold. Once all
// hold their records it prints its ground truth as one JSON line (heap_defers: every heap
// defer registered; host_pending, plugin_pending: still pending; churned: the plugin's defers
// that ran; plugin: its path) and exits after -hold.
//
//	-plugin PATH the plugin to open
package main

import (
	"deferprobe.test/programs/internal/protocol"
	"flag"
	"fmt"
	"os"
	"plugin"
	"runtime"
	"time"
)

type groundTruth struct {
	protocol.Counts
	HostPending   int    `json:"host_pending"`
	PluginPending int    `json:"plugin_pending"`
	Churned       int    `json:"churned"`
	Plugin        string `json:"plugin"`
}

var release = make(chan struct{})

//go:noinline
func hold(n int, ready chan<- struct{}) {
	ran := 0
	for i := 0; i < n; i++ {
		defer func() { ran++ }()
	}
	ready <- struct{}{}
	<-release
}

func lookup(p *plugin.Plugin, name string) plugin.Symbol {
	symbol, err := p.Lookup(name)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	return symbol
}

func main() {
	path := flag.String("plugin", "", "the plugin to open")
	n := flag.Int("n", 30, "heap defers per frame")
	churn := flag.Int("churn", 2, "calls of the plugin's Churn")
	hosts := flag.Int("host", 2, "goroutines holding defers in the host's code")
	plugins := flag.Int("plugin-goroutines", 3, "goroutines holding defers in the plugin's code")
	delay := flag.Duration("delay", 0, "wait this long after opening the plugin")
	holdFor := flag.Duration("hold", 0, "after printing the ground truth, wait this long")
	flag.Parse()

	p, err := plugin.Open(*path)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	pluginHold := lookup(p, "Hold").(func(int, chan<- struct{}, <-chan struct{}))
	pluginChurn := lookup(p, "Churn").(func(int) int)
	time.Sleep(*delay)

	var truth groundTruth
	for i := 0; i < *churn; i++ {
		truth.Churned += pluginChurn(*n)
	}
	ready := make(chan struct{})
	for i := 0; i < *hosts; i++ {
		go hold(*n, ready)
	}
	for i := 0; i < *plugins; i++ {
		go pluginHold(*n, ready, release)
	}
	for i := 0; i < *hosts+*plugins; i++ {
		<-ready
	}
	truth.HeapDefers = (*churn + *hosts + *plugins) * *n
	truth.HostPending = *hosts * *n
	truth.PluginPending = *plugins * *n
	truth.Plugin = *path
	truth.GoVersion = runtime.Version()
	protocol.Print(truth)
	time.Sleep(*holdFor)
	os.Exit(0)
}
