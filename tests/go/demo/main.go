// demo is a small service with a defer-in-loop leak, bundled so `./x demo` has something real
// to trace.
//
// A long-lived "batch pump" goroutine runs one endless loop inside a single function call. Each
// batch builds a map of results and registers `defer release(batch)` inside the loop: the
// deferred closure keeps the map alive until the function returns, which it never does. The
// request handlers also defer inside a loop, but they return, so their defers are released.
package main

import (
	"flag"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

var released int

func release(results map[string]int) { released += len(results) }

// pumpBatches never returns: every deferred release() stays pending, holding its map.
func pumpBatches(tick time.Duration, entries int) {
	for batch := 0; ; batch++ {
		results := make(map[string]int, entries)
		for i := 0; i < entries; i++ {
			results["item-"+strconv.Itoa(i)] = batch * i
		}
		defer release(results)
		time.Sleep(tick)
	}
}

// handleRequest defers inside a loop too, but returns: its records are released each time.
func handleRequest(id int) int {
	total := 0
	for part := 0; part < 3; part++ {
		scratch := map[int]int{part: id}
		defer func() { total += len(scratch) }()
	}
	return total
}

func main() {
	tick := flag.Duration("batch-every", 20*time.Millisecond, "time between batches")
	entries := flag.Int("entries", 16, "entries per batch map")
	flag.Parse()

	go pumpBatches(*tick, *entries)
	go func() {
		for id := 0; ; id++ {
			handleRequest(id)
			time.Sleep(5 * time.Millisecond)
		}
	}()

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
}
