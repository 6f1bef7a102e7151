// workload does a known amount of the work deferprobe counts (heap defers, map writes,
// goroutine exits, allocations) and prints its own ground truth as one JSON line on stdout.
//
//	-calls N -defers D   N calls of a function that registers D defers in a loop (heap defers)
//	-map-writes W        W string-key and W int-key map writes
//	-goroutines G        G goroutines that each register 2 loop defers and exit
//	-wait                print "ready" and wait for a line on stdin before working
//	-hold                after printing the result, wait for stdin to close before exiting
//	-exit-code C         exit with status C
//	-linger D            after printing the result (and -hold), sleep D before exiting
//	-ignore-signals      ignore SIGINT and SIGTERM (only SIGKILL ends it early)
//
// Built with cgo (CGO_ENABLED=1), cgo.go adds a C call to every loop-defer call and the
// ground truth says "cgo":true.
package main

import (
	"deferprobe.test/programs/internal/protocol"
	"flag"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"time"
)

var sink int

// cCall calls into C; set by cgo.go when the program is built with cgo.
var cCall func(int) int

//go:noinline
func loopDefers(n int, m map[string]int) {
	if cCall != nil {
		sink += cCall(n)
	}
	for i := 0; i < n; i++ {
		defer func() { sink += len(m) }()
	}
}

type groundTruth struct {
	protocol.Counts
	// Returns of frames that own heap defer records (calls of loopDefers): each returns
	// through one call of runtime.deferreturn.
	HeapDeferFrameReturns int  `json:"heap_defer_frame_returns"`
	Cgo                   bool `json:"cgo"`
}

func main() {
	calls := flag.Int("calls", 20, "calls of the loop-defer function")
	defers := flag.Int("defers", 25, "defers registered per call")
	mapWrites := flag.Int("map-writes", 500, "string-key (and int-key) map writes")
	goroutines := flag.Int("goroutines", 10, "goroutines started and ended")
	wait := flag.Bool("wait", false, "wait for a line on stdin before working")
	hold := flag.Bool("hold", false, "wait for stdin to close before exiting")
	exitCode := flag.Int("exit-code", 0, "exit status")
	linger := flag.Duration("linger", 0, "sleep this long before exiting")
	ignoreSignals := flag.Bool("ignore-signals", false, "ignore SIGINT and SIGTERM")
	flag.Parse()
	if *ignoreSignals {
		signal.Ignore(syscall.SIGINT, syscall.SIGTERM)
	}

	stdin := protocol.NewStdin()
	keys := make([]string, *mapWrites)
	for i := range keys {
		keys[i] = "key-" + strconv.Itoa(i)
	}
	if *wait {
		stdin.WaitForGo()
	}

	var truth groundTruth
	m := make(map[string]int)
	for i := 0; i < *calls; i++ {
		loopDefers(*defers, m)
		truth.HeapDefers += *defers
		truth.HeapDeferFrameReturns++
	}
	strMap := make(map[string]int)
	intMap := make(map[int]int)
	for i, k := range keys {
		strMap[k] = i
		intMap[i] = i
	}
	truth.StrMapWrites = len(keys)
	truth.IntMapWrites = len(keys)

	var wg sync.WaitGroup
	for i := 0; i < *goroutines; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			loopDefers(2, m)
		}()
	}
	wg.Wait()
	truth.HeapDefers += 2 * *goroutines
	truth.HeapDeferFrameReturns += *goroutines
	truth.GoroutinesEnded = *goroutines

	var stats runtime.MemStats
	runtime.ReadMemStats(&stats)
	truth.Mallocs = stats.Mallocs
	truth.GoVersion = runtime.Version()
	truth.Cgo = cCall != nil
	protocol.Print(truth)
	if *hold {
		stdin.HoldUntilEOF()
	}
	time.Sleep(*linger)
	os.Exit(*exitCode)
}
