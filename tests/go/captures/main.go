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
//	-wait                print "ready" and wait for a line on stdin before working
package main

import (
	"deferprobe.test/programs/internal/protocol"
	"flag"
	"os"
	"runtime"
	"strconv"
	"sync"
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
	default:
		os.Stderr.WriteString("unknown scenario " + *scenario + "\n")
		os.Exit(2)
	}
	protocol.Print(t)
	stdin.HoldUntilEOF()
}
