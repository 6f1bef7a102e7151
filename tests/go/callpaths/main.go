// callpaths holds heap defer records (runtime.deferproc) along known call paths, for checking
// the stacks of deferprobe's --pprof profiles. One function defers in a loop, main.accumulate;
// each holder goroutine reaches it by a path of its own, and it then blocks below it, so the
// goroutine's innermost frames are not the frame holding the records:
//
//	orders   main.serveOrders → main.ingestOrders → main.accumulate (-orders records), then
//	         parked on a channel receive in main.park
//	users    main.serveUsers → main.ingestUsers → main.accumulate (-users records), parked
//	         the same way
//	syscall  main.serveSyscall → main.accumulate (-syscall records), then blocked in a read(2)
//	         of a blocking pipe (syscall.Read): the goroutine is in a syscall, not parked
//
// Every closure captures a map[string]int of 1 + i%3 entries. Once every holder holds its
// records, the program prints its ground truth as one JSON line: per holder, the id of its
// goroutine, the defer statement's function, file and line, the records pending, the callers
// of main.accumulate outward (as runtime.Callers names them) and how it blocks; and the total.
// It then holds its state until stdin closes.
//
//	-orders N, -users N, -syscall N   records per holder (30, 12, 5)
//	-wait                             print "ready" and wait for a line on stdin before working
package main

import (
	"deferprobe.test/programs/internal/protocol"
	"flag"
	"runtime"
	"strconv"
	"strings"
	"syscall"
)

var sink int

type truth struct {
	GoVersion     string   `json:"go_version"`
	PendingDefers int      `json:"pending_defers"`
	Holders       []holder `json:"holders"`
}

type holder struct {
	Path     string   `json:"path"`
	Goid     int64    `json:"goid"`
	Function string   `json:"function"`
	File     string   `json:"file"`
	Line     int      `json:"line"`
	Pending  int      `json:"pending"`
	Callers  []string `json:"callers"` // of the deferring function, innermost first
	Blocked  string   `json:"blocked"` // "channel" or "syscall"
}

// held is where the parked holders wait until the process exits.
var held = make(chan struct{})

// goid is the current goroutine's id, from its stack trace's header ("goroutine 7 [").
func goid() int64 {
	buf := make([]byte, 64)
	buf = buf[:runtime.Stack(buf, false)]
	id, _ := strconv.ParseInt(strings.Fields(string(buf))[1], 10, 64)
	return id
}

// callers names the functions above the caller of callers, up to main's own, innermost first.
func callers() []string {
	pcs := make([]uintptr, 32)
	frames := runtime.CallersFrames(pcs[:runtime.Callers(3, pcs)])
	var names []string
	for {
		frame, more := frames.Next()
		if !strings.HasPrefix(frame.Function, "main.") {
			return names
		}
		names = append(names, frame.Function)
		if !more {
			return names
		}
	}
}

// accumulate defers n times, each closure capturing its own map, then blocks in block.
//
//go:noinline
func accumulate(n int, h *holder, ready chan<- struct{}, block func()) {
	h.Goid, h.Callers = goid(), callers()
	for i := 0; i < n; i++ {
		m := make(map[string]int)
		for j := 0; j <= i%3; j++ {
			m["key-"+strconv.Itoa(j)] = j
		}
		defer func() { sink += len(m) }()
		pc, file, line, _ := runtime.Caller(0)
		h.Function, h.File, h.Line = runtime.FuncForPC(pc).Name(), file, line-1
		h.Pending++
	}
	ready <- struct{}{}
	block()
}

//go:noinline
func park() { <-held }

//go:noinline
func ingestOrders(n int, h *holder, ready chan<- struct{}) { accumulate(n, h, ready, park) }

//go:noinline
func serveOrders(n int, h *holder, ready chan<- struct{}) { ingestOrders(n, h, ready) }

//go:noinline
func ingestUsers(n int, h *holder, ready chan<- struct{}) { accumulate(n, h, ready, park) }

//go:noinline
func serveUsers(n int, h *holder, ready chan<- struct{}) { ingestUsers(n, h, ready) }

//go:noinline
func serveSyscall(n int, h *holder, ready chan<- struct{}, fd int) {
	accumulate(n, h, ready, func() {
		buf := make([]byte, 1)
		syscall.Read(fd, buf) // nothing is ever written: blocks in read(2) for good
	})
}

func main() {
	orders := flag.Int("orders", 30, "records held by the orders path")
	users := flag.Int("users", 12, "records held by the users path")
	inSyscall := flag.Int("syscall", 5, "records held by the goroutine blocked in a syscall")
	wait := flag.Bool("wait", false, "wait for a line on stdin before working")
	flag.Parse()

	stdin := protocol.NewStdin()
	if *wait {
		stdin.WaitForGo()
	}
	var pipe [2]int
	if err := syscall.Pipe(pipe[:]); err != nil {
		panic(err)
	}
	holders := []holder{{Path: "orders", Blocked: "channel"}, {Path: "users", Blocked: "channel"},
		{Path: "syscall", Blocked: "syscall"}}
	ready := make(chan struct{})
	go serveOrders(*orders, &holders[0], ready)
	go serveUsers(*users, &holders[1], ready)
	go serveSyscall(*inSyscall, &holders[2], ready, pipe[0])
	for range holders {
		<-ready
	}
	t := truth{GoVersion: runtime.Version(), Holders: holders}
	for _, h := range holders {
		t.PendingDefers += h.Pending
	}
	protocol.Print(t)
	stdin.HoldUntilEOF()
}
