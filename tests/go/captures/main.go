// captures holds deferred closures the way leaky Go services do, one scenario at a time, and
// prints its own ground truth (pending defers, captured maps and their entries, the function
// and line of the defer statement) as one JSON line once everything is in place. It then holds
// its state until stdin closes.
//
//	-scenario byvalue    one goroutine, -n loop defers each capturing its own map by value
//	-scenario byref      the same, capturing the map variable by reference (the closure assigns it)
//	-scenario handler    a handler called -n times that defers in a loop and returns
//	-scenario panics     panics recovered mid-frame and in outer frames, then -n pending
//	-scenario goexit     goroutines ending with runtime.Goexit with pending records, then -n pending
//	-scenario many       -goroutines goroutines, each holding -n pending defers
//	-scenario churn      1 s of goroutines that start and end (about 100k/s) and no heap defer,
//	                     then one goroutine holding 1 pending defer and, 300 ms later, 400
//	                     holding -n (their ids in the truth). Before the churn, 200 goroutines
//	                     pass through a heap-defer frame without deferring, and wait; they end
//	                     after it.
//	-wait                print "ready" and wait for a line on stdin before working
package main

import (
	"deferprobe.test/programs/internal/protocol"
	"flag"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"
)

var sink int

type truth struct {
	Scenario           string `json:"scenario"`
	PendingDefers      int    `json:"pending_defers"`
	PendingGoroutines  int    `json:"pending_goroutines"`
	CapturedMaps       int    `json:"captured_maps"`
	CapturedMapEntries int    `json:"captured_map_entries"`
	Function           string `json:"function"`
	File               string `json:"file"`
	Line               int    `json:"line"`
	Registered         int    `json:"registered"`
	Released           int    `json:"released"`
	// The ids of the goroutines holding pending defers (-scenario churn).
	Goroutines []int64 `json:"goroutines,omitempty"`
}

// goid is the current goroutine's id, from its stack trace's header ("goroutine 7 [").
func goid() int64 {
	buf := make([]byte, 64)
	buf = buf[:runtime.Stack(buf, false)]
	id, _ := strconv.ParseInt(strings.Fields(string(buf))[1], 10, 64)
	return id
}

// deferIn defers n times in a loop: its frame owns heap records, and calls deferreturn on
// return even when n is 0.
//
//go:noinline
func deferIn(n int) {
	for i := 0; i < n; i++ {
		defer func() { sink++ }()
	}
}

// lineAbove returns its caller's file and the line just above the call: the `defer`
// statement the call follows.
func lineAbove() (string, int) {
	_, file, line, _ := runtime.Caller(1)
	return file, line - 1
}

var keys = func() []string {
	k := make([]string, 64)
	for i := range k {
		k[i] = "key-" + strconv.Itoa(i)
	}
	return k
}()

// newMap makes a map with 1 + i%7 entries (written with mapassign_faststr).
func newMap(i int) map[string]int {
	m := make(map[string]int)
	for j := 0; j <= i%7; j++ {
		m[keys[j]] = j
	}
	return m
}

// held is where the blocked goroutines wait until the process exits.
var held = make(chan struct{})

//go:noinline
func holdByValue(n int, t *truth, ready chan<- struct{}) {
	for i := 0; i < n; i++ {
		m := newMap(i)
		t.CapturedMapEntries += len(m)
		defer func() { sink += len(m) }()
		t.File, t.Line = lineAbove()
	}
	t.Function = "main.holdByValue"
	ready <- struct{}{}
	<-held
}

//go:noinline
func holdByReference(n int, t *truth, ready chan<- struct{}) {
	for i := 0; i < n; i++ {
		m := newMap(i)
		t.CapturedMapEntries += len(m)
		defer func() { m = nil }()
		t.File, t.Line = lineAbove()
	}
	t.Function = "main.holdByReference"
	ready <- struct{}{}
	<-held
}

//go:noinline
func handle(request int) int {
	total := 0
	for part := 0; part < 3; part++ {
		m := newMap(request + part)
		defer func() { total += len(m) }()
	}
	return total
}

// panicInside registers n loop defers, then panics; the panic runs them all and is recovered
// by the caller's frame, so this frame never returns through deferreturn.
//
//go:noinline
func panicInside(n int) {
	for i := 0; i < n; i++ {
		m := newMap(i)
		defer func() { sink += len(m) }()
	}
	panic("boom")
}

//go:noinline
func recoverOuter(n int) (recovered bool) {
	defer func() { recovered = recover() != nil }()
	for i := 0; i < n; i++ {
		m := newMap(i)
		defer func() { sink += len(m) }()
	}
	panicInside(n)
	return false
}

// recoverMidFrame panics half way through its own loop and recovers in the same frame.
//
//go:noinline
func recoverMidFrame(n int) {
	defer func() { recover() }()
	for i := 0; i < n; i++ {
		m := newMap(i)
		defer func() { sink += len(m) }()
		if i == n/2 {
			panic("half way")
		}
	}
}

//go:noinline
func exitWithPending(n int) {
	for i := 0; i < n; i++ {
		m := newMap(i)
		defer func() { sink += len(m) }()
	}
	runtime.Goexit()
}

func main() {
	scenario := flag.String("scenario", "byvalue", "what to do")
	n := flag.Int("n", 300, "defers (or handler calls)")
	goroutines := flag.Int("goroutines", 5000, "goroutines for -scenario many")
	wait := flag.Bool("wait", false, "wait for a line on stdin before working")
	flag.Parse()

	stdin := protocol.NewStdin()
	if *wait {
		stdin.WaitForGo()
	}

	t := truth{Scenario: *scenario}
	ready := make(chan struct{})
	switch *scenario {
	case "byvalue", "byref":
		hold := holdByValue
		if *scenario == "byref" {
			hold = holdByReference
		}
		go hold(*n, &t, ready)
		<-ready
		t.PendingDefers, t.PendingGoroutines, t.CapturedMaps = *n, 1, *n
		t.Registered = *n
	case "handler":
		for i := 0; i < *n; i++ {
			handle(i)
		}
		t.Registered, t.Released = 3**n, 3**n
		t.Function = "main.handle"
	case "panics":
		go func() {
			for i := 0; i < 10; i++ {
				recoverOuter(8)
				recoverMidFrame(8)
			}
			holdByValue(*n, &t, ready)
		}()
		<-ready
		t.PendingDefers, t.PendingGoroutines, t.CapturedMaps = *n, 1, *n
	case "goexit":
		var wg sync.WaitGroup
		for i := 0; i < 20; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				exitWithPending(10)
			}()
		}
		wg.Wait()
		go holdByValue(*n, &t, ready)
		<-ready
		t.PendingDefers, t.PendingGoroutines, t.CapturedMaps = *n, 1, *n
	case "many":
		var mu sync.Mutex
		all := make([]truth, *goroutines)
		for g := 0; g < *goroutines; g++ {
			go holdByValue(*n, &all[g], ready)
		}
		for g := 0; g < *goroutines; g++ {
			<-ready
		}
		mu.Lock()
		for _, one := range all {
			t.CapturedMapEntries += one.CapturedMapEntries
		}
		mu.Unlock()
		t.PendingDefers, t.PendingGoroutines = *n**goroutines, *goroutines
		t.CapturedMaps = *n * *goroutines
		t.Function, t.File, t.Line = all[0].Function, all[0].File, all[0].Line
	case "churn":
		release := make(chan struct{})
		var passed, ended sync.WaitGroup
		for i := 0; i < 200; i++ {
			passed.Add(1)
			ended.Add(1)
			go func() {
				defer ended.Done()
				deferIn(0)
				passed.Done()
				<-release
			}()
		}
		passed.Wait()
		for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); {
			var wg sync.WaitGroup
			for j := 0; j < 100; j++ {
				wg.Add(1)
				go wg.Done()
			}
			wg.Wait()
			time.Sleep(time.Millisecond)
		}
		close(release)
		ended.Wait()
		// The first heap defer; deferprobe attaches the exit probe for good within 20 ms, and
		// turns its goroutine-id cache on again. Then 400 goroutines: more than the runtime
		// keeps free, so some run on the g's of the 200.
		const holders = 400
		all := make([]truth, holders+1)
		ids := make([]int64, holders+1)
		hold := func(g, n int) {
			ids[g] = goid()
			holdByValue(n, &all[g], ready)
		}
		go hold(holders, 1)
		<-ready
		time.Sleep(300 * time.Millisecond)
		for g := 0; g < holders; g++ {
			go hold(g, *n)
		}
		for g := 0; g < holders; g++ {
			<-ready
		}
		t.PendingDefers, t.PendingGoroutines = *n*holders+1, holders+1
		t.Registered = t.PendingDefers
		t.Goroutines = ids
	default:
		os.Stderr.WriteString("unknown scenario " + *scenario + "\n")
		os.Exit(2)
	}
	protocol.Print(t)
	stdin.HoldUntilEOF()
}
