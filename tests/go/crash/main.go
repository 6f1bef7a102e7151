// crash dies the way a Go program dies of an unrecovered panic, for tracing a run to its very
// end. -holders H goroutines each register -n heap defers (a defer in a loop, in one frame)
// and block for good; one more goroutine registers -n heap defers the same way, then panics,
// and nothing recovers: the runtime runs that goroutine's deferred calls during the panic
// (never through deferreturn), then kills the process (exit status 2). The holders' deferred
// calls never run.
//
// Once every goroutine holds its records, the program prints its ground truth as one JSON line:
// heap_defers (registered in all), held_pending (the holders' records, still pending when the
// program dies), holders, panicking_goid and panicking_pending (the records of the goroutine
// that panics). Each of that goroutine's deferred closures counts itself as it runs during the
// panic, and the last one prints {"ran_during_panic": N}.
//
//	-n N       heap defers per goroutine (40)
//	-holders H goroutines that hold their records (3)
//	-wait      print "ready" and wait for a line on stdin before working, and another after
//	           printing the ground truth before panicking
//	-delay D   without -wait: sleep D after printing the ground truth before panicking
//	-exit      exit normally (status 0) instead of panicking: every goroutine's records,
//	           (holders + 1) * n, are still pending then
package main

import (
	"deferprobe.test/programs/internal/protocol"
	"flag"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"
)

type groundTruth struct {
	protocol.Counts
	HeldPending      int   `json:"held_pending"`
	Holders          int   `json:"holders"`
	PanickingGoid    int64 `json:"panicking_goid"`
	PanickingPending int   `json:"panicking_pending"`
}

// goid is the current goroutine's id, from its stack trace's header ("goroutine 7 [").
func goid() int64 {
	buf := make([]byte, 64)
	buf = buf[:runtime.Stack(buf, false)]
	id, _ := strconv.ParseInt(strings.Fields(string(buf))[1], 10, 64)
	return id
}

var forever = make(chan struct{})

// hold registers n heap defers in its frame, says so, and blocks for good.
//
//go:noinline
func hold(n int, ready chan<- struct{}) {
	ran := 0
	for i := 0; i < n; i++ {
		defer func() { ran++ }()
	}
	ready <- struct{}{}
	<-forever
}

// panicAfter registers n heap defers in its frame, sends its goroutine id, waits for go, then
// panics. The deferred calls run during the panic, newest first; the last one reports.
//
//go:noinline
func panicAfter(n int, ready chan<- int64, start <-chan struct{}) {
	ran := 0
	for i := 0; i < n; i++ {
		defer func() {
			ran++
			if ran == n {
				fmt.Printf("{\"ran_during_panic\":%d}\n", ran)
			}
		}()
	}
	ready <- goid()
	<-start
	panic("crash: nothing recovers this")
}

func main() {
	n := flag.Int("n", 40, "heap defers per goroutine")
	holders := flag.Int("holders", 3, "goroutines that hold their records")
	wait := flag.Bool("wait", false, "wait for stdin before working and before panicking")
	delay := flag.Duration("delay", 0, "without -wait: sleep this long before panicking")
	exit := flag.Bool("exit", false, "exit with status 0 instead of panicking")
	flag.Parse()

	stdin := protocol.NewStdin()
	if *wait {
		stdin.WaitForGo()
	}
	held := make(chan struct{})
	for i := 0; i < *holders; i++ {
		go hold(*n, held)
	}
	for i := 0; i < *holders; i++ {
		<-held
	}
	panicking := make(chan int64)
	start := make(chan struct{})
	go panicAfter(*n, panicking, start)
	truth := groundTruth{
		HeldPending:      *holders * *n,
		Holders:          *holders,
		PanickingGoid:    <-panicking,
		PanickingPending: *n,
	}
	truth.HeapDefers = (*holders + 1) * *n
	truth.GoVersion = runtime.Version()
	protocol.Print(truth)
	if *wait {
		if !stdin.WaitForLine() {
			os.Exit(3)
		}
	} else {
		time.Sleep(*delay)
	}
	if *exit {
		os.Exit(0)
	}
	close(start)
	<-forever
}
