// phases works in steps its tracer's test drives, so that reports made while tracing goes on
// (metrics, interim reports) can be checked against what the program has done so far. It
// prints "ready" and waits for a line on stdin; that line and every later one run one phase:
//
//	phase i (1, 2, …)  a new goroutine registers 5*i heap defers in a loop, each closure
//	                   capturing a map of its own with i entries, and blocks with them pending;
//	                   then -released heap defers are registered in a loop in a function that
//	                   returns, releasing them
//
// After each phase it prints its ground truth so far as one JSON line: heap_defers (every
// registration), pending_defers (still pending), heap_defer_frame_returns (returns of frames
// owning heap defer records, each through one runtime.deferreturn: one per phase), released
// (records run), the phase, and the function, file and line of each of the two defer
// statements. It exits when stdin closes, the records still pending.
//
//	-released N   heap defers registered and released per phase (10)
package main

import (
	"deferprobe.test/programs/internal/protocol"
	"flag"
	"runtime"
	"strconv"
)

var sink int

type site struct {
	Function string `json:"function"`
	File     string `json:"file"`
	Line     int    `json:"line"`
}

type truth struct {
	HeapDefers    int    `json:"heap_defers"`
	PendingDefers int    `json:"pending_defers"`
	FrameReturns  int    `json:"heap_defer_frame_returns"`
	Released      int    `json:"released"`
	Phase         int    `json:"phase"`
	PendingSite   site   `json:"pending_site"`
	ReleasedSite  site   `json:"released_site"`
	GoVersion     string `json:"go_version"`
}

// deferAbove takes runtime.Caller(0) called on the line just after a `defer` statement.
func (s *site) deferAbove(pc uintptr, file string, line int, _ bool) {
	s.Function, s.File, s.Line = runtime.FuncForPC(pc).Name(), file, line-1
}

// held keeps the pending records' goroutines blocked until the process exits.
var held = make(chan struct{})

//go:noinline
func holdPending(n, entries int, s *site, ready chan<- struct{}) {
	for i := 0; i < n; i++ {
		m := make(map[string]int)
		for j := 0; j < entries; j++ {
			m["key-"+strconv.Itoa(j)] = j
		}
		defer func() { sink += len(m) }()
		s.deferAbove(runtime.Caller(0))
	}
	ready <- struct{}{}
	<-held
}

//go:noinline
func release(n int, s *site) {
	for i := 0; i < n; i++ {
		defer func() { sink += i }()
		s.deferAbove(runtime.Caller(0))
	}
}

func main() {
	released := flag.Int("released", 10, "heap defers registered and released per phase")
	flag.Parse()
	stdin := protocol.NewStdin()
	stdin.WaitForGo()
	t := truth{GoVersion: runtime.Version()}
	for {
		t.Phase++
		pending := 5 * t.Phase
		ready := make(chan struct{})
		go holdPending(pending, t.Phase, &t.PendingSite, ready)
		<-ready
		release(*released, &t.ReleasedSite)
		t.HeapDefers += pending + *released
		t.PendingDefers += pending
		t.FrameReturns++
		t.Released += *released
		protocol.Print(t)
		if !stdin.WaitForLine() {
			return
		}
	}
}
