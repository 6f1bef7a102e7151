// pending is a target for attaching to a Go program late: its goroutines hold heap defer
// records (runtime.deferproc) registered before any tracer attaches, and block, so a tracer
// reading the runtime's memory must find them there. Each scenario runs in a goroutine of its
// own, with a defer in a loop in a //go:noinline function:
//
//	maps_by_value      -n closures, each capturing its own map[string]int (1 + i%7 entries)
//	maps_by_reference  the same with map[int64]big (1 + i%5 entries), the closure assigning the
//	                   variable, so it is captured by reference
//	slice              -n closures capturing make([]byte, 100+i, 200+i)
//	string             -n closures capturing a string of 10+i bytes built at run time
//	struct_pointer     -n closures capturing &session{id: i, buf: make([]byte, 64)}
//	file               -n `defer f.Close()` of a file opened for it (the program itself), so
//	                   -n needs as many descriptors free
//	panic_then_hold    a function defers 8 times capturing maps and panics (a site with 0
//	                   pending); its caller recovers, then defers -n times capturing maps by
//	                   value, and blocks
//	rangefunc          (Go 1.23 and later, rangefunc.go) -n closures capturing maps in the
//	                   body of a range-over-func loop, the function blocking after the loop
//
// Once every goroutine holds its records, the program prints its ground truth as one JSON
// line: one entry per defer site (the scenario, the id of the goroutine holding its records,
// the function, file and line of the defer statement, the records still pending and what they
// captured: the captured variable's type, and the distinct maps, their entries, the slices'
// len and cap, the strings' bytes, summed over the pending records), and the totals. It then
// holds its state until stdin closes. -n 0 leaves the sites' function, file and line empty.
//
//	-n N       records per site (50)
//	-wait      print "ready" and wait for a line on stdin before working
//	-churn D   after printing the truth, for D: allocate and drop maps and objects of the
//	           session's size, collecting garbage every 100 ms, so that freed maps' memory
//	           is reused by other objects while the closures above stay pending
package main

import (
	"deferprobe.test/programs/internal/protocol"
	"flag"
	"os"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"time"
)

var sink int

type truth struct {
	GoVersion         string `json:"go_version"`
	PendingDefers     int    `json:"pending_defers"`
	PendingGoroutines int    `json:"pending_goroutines"`
	Sites             []site `json:"sites"`
}

// site is one defer statement and the records of it still pending.
type site struct {
	Scenario    string `json:"scenario"`
	Goid        int64  `json:"goid"`
	Function    string `json:"function"`
	File        string `json:"file"`
	Line        int    `json:"line"`
	Pending     int    `json:"pending"`
	Capture     string `json:"capture"` // map, map_ref, slice, string, file or struct_pointer
	Type        string `json:"type"`    // the captured variable's, as reflect prints it
	Maps        int    `json:"maps"`
	MapEntries  int    `json:"map_entries"`
	SliceLen    int    `json:"slice_len"`
	SliceCap    int    `json:"slice_cap"`
	StringBytes int    `json:"string_bytes"`
}

// newSite starts the truth of a defer site whose records the current goroutine holds.
func newSite(scenario, capture string) site {
	return site{Scenario: scenario, Goid: goid(), Capture: capture}
}

// deferAbove takes runtime.Caller(0) called on the line just after a `defer` statement: the
// function (as runtime.FuncForPC names it), file and line of that statement.
func (s *site) deferAbove(pc uintptr, file string, line int, _ bool) {
	s.Function, s.File, s.Line = runtime.FuncForPC(pc).Name(), file, line-1
}

// record counts one pending record capturing v.
func (s *site) record(v any) {
	s.Pending++
	s.Type = reflect.TypeOf(v).String()
	switch r := reflect.ValueOf(v); r.Kind() {
	case reflect.Map:
		s.Maps++
		s.MapEntries += r.Len()
	case reflect.Slice:
		s.SliceLen += r.Len()
		s.SliceCap += r.Cap()
	case reflect.String:
		s.StringBytes += r.Len()
	}
}

// goid is the current goroutine's id, from its stack trace's header ("goroutine 7 [").
func goid() int64 {
	buf := make([]byte, 64)
	buf = buf[:runtime.Stack(buf, false)]
	id, _ := strconv.ParseInt(strings.Fields(string(buf))[1], 10, 64)
	return id
}

// scenario fills in the sites whose records it holds, says so on ready, and blocks for good.
type scenario func(n int, sites *[]site, ready chan<- struct{})

// scenarios are started in this order; rangefunc.go adds its own.
var scenarios = []scenario{
	holdMapsByValue, holdMapsByReference, holdSlices, holdStrings, holdFiles,
	holdStructPointers, holdAfterPanic,
}

// held is where the holding goroutines wait until the process exits.
var held = make(chan struct{})

var keys = func() []string {
	k := make([]string, 64)
	for i := range k {
		k[i] = "key-" + strconv.Itoa(i)
	}
	return k
}()

// stringMap makes a map with 1 + i%7 entries.
func stringMap(i int) map[string]int {
	m := make(map[string]int)
	for j := 0; j <= i%7; j++ {
		m[keys[j]] = j
	}
	return m
}

type big struct{ a, b [4]int64 }

// bigMap makes a map with 1 + i%5 entries.
func bigMap(i int) map[int64]big {
	m := make(map[int64]big)
	for j := 0; j <= i%5; j++ {
		m[int64(j)] = big{a: [4]int64{int64(i)}, b: [4]int64{int64(j)}}
	}
	return m
}

type session struct {
	id  int
	buf []byte
}

//go:noinline
func holdMapsByValue(n int, sites *[]site, ready chan<- struct{}) {
	s := newSite("maps_by_value", "map")
	for i := 0; i < n; i++ {
		m := stringMap(i)
		defer func() { sink += len(m) }()
		s.deferAbove(runtime.Caller(0))
		s.record(m)
	}
	*sites = []site{s}
	ready <- struct{}{}
	<-held
}

//go:noinline
func holdMapsByReference(n int, sites *[]site, ready chan<- struct{}) {
	s := newSite("maps_by_reference", "map_ref")
	for i := 0; i < n; i++ {
		m := bigMap(i)
		defer func() { m = nil }()
		s.deferAbove(runtime.Caller(0))
		s.record(m)
	}
	*sites = []site{s}
	ready <- struct{}{}
	<-held
}

//go:noinline
func holdSlices(n int, sites *[]site, ready chan<- struct{}) {
	s := newSite("slice", "slice")
	for i := 0; i < n; i++ {
		b := make([]byte, 100+i, 200+i)
		defer func() { sink += len(b) + cap(b) }()
		s.deferAbove(runtime.Caller(0))
		s.record(b)
	}
	*sites = []site{s}
	ready <- struct{}{}
	<-held
}

//go:noinline
func holdStrings(n int, sites *[]site, ready chan<- struct{}) {
	s := newSite("string", "string")
	for i := 0; i < n; i++ {
		str := strings.Repeat("s", 10+i)
		defer func() { sink += len(str) }()
		s.deferAbove(runtime.Caller(0))
		s.record(str)
	}
	*sites = []site{s}
	ready <- struct{}{}
	<-held
}

// holdFiles defers a method call, not a closure literal: the compiler wraps it in a closure
// capturing f.
//
//go:noinline
func holdFiles(n int, sites *[]site, ready chan<- struct{}) {
	s := newSite("file", "file")
	for i := 0; i < n; i++ {
		f, err := os.Open("/proc/self/exe")
		if err != nil {
			os.Stderr.WriteString(err.Error() + "\n")
			os.Exit(1)
		}
		defer f.Close()
		s.deferAbove(runtime.Caller(0))
		s.record(f)
	}
	*sites = []site{s}
	ready <- struct{}{}
	<-held
}

//go:noinline
func holdStructPointers(n int, sites *[]site, ready chan<- struct{}) {
	s := newSite("struct_pointer", "struct_pointer")
	for i := 0; i < n; i++ {
		ses := &session{id: i, buf: make([]byte, 64)}
		defer func() { sink += ses.id }()
		s.deferAbove(runtime.Caller(0))
		s.record(ses)
	}
	*sites = []site{s}
	ready <- struct{}{}
	<-held
}

// deferThenPanic defers k times, then panics: the panic runs all k records, so none of its site
// stays pending.
//
//go:noinline
func deferThenPanic(k int, s *site) {
	for i := 0; i < k; i++ {
		m := stringMap(i)
		defer func() { sink += len(m) }()
		s.deferAbove(runtime.Caller(0))
		s.Type = reflect.TypeOf(m).String()
	}
	panic("boom")
}

// survive recovers the panic of deferThenPanic, so that its caller goes on.
//
//go:noinline
func survive(k int, s *site) {
	defer func() { recover() }()
	deferThenPanic(k, s)
}

//go:noinline
func holdAfterPanic(n int, sites *[]site, ready chan<- struct{}) {
	panicked := newSite("panic_then_hold", "map")
	survive(8, &panicked)
	s := newSite("panic_then_hold", "map")
	for i := 0; i < n; i++ {
		m := stringMap(i)
		defer func() { sink += len(m) }()
		s.deferAbove(runtime.Caller(0))
		s.record(m)
	}
	*sites = []site{panicked, s}
	ready <- struct{}{}
	<-held
}

func main() {
	n := flag.Int("n", 50, "records per site")
	wait := flag.Bool("wait", false, "wait for a line on stdin before working")
	churnFor := flag.Duration("churn", 0, "allocate and free maps and objects for this long")
	flag.Parse()

	stdin := protocol.NewStdin()
	if *wait {
		stdin.WaitForGo()
	}

	ready := make(chan struct{})
	sites := make([][]site, len(scenarios))
	for i, hold := range scenarios {
		go hold(*n, &sites[i], ready)
	}
	for range scenarios {
		<-ready
	}
	t := truth{GoVersion: runtime.Version()}
	holding := map[int64]bool{}
	for _, some := range sites {
		for _, s := range some {
			t.Sites = append(t.Sites, s)
			t.PendingDefers += s.Pending
			if s.Pending > 0 {
				holding[s.Goid] = true
			}
		}
	}
	t.PendingGoroutines = len(holding)
	protocol.Print(t)
	if *churnFor > 0 {
		go churn(*churnFor)
	}
	stdin.HoldUntilEOF()
}

// churnSink keeps the newest garbage reachable for a moment.
var churnSink []any

// churn allocates maps and session-sized objects and drops them, for d.
func churn(d time.Duration) {
	lastGC := time.Now()
	for start := time.Now(); time.Since(start) < d; {
		m := make(map[string]int)
		for j := 0; j < 8; j++ {
			m[keys[j]] = j
		}
		churnSink = append(churnSink, m, &session{id: len(churnSink), buf: make([]byte, 64)})
		if len(churnSink) > 4096 {
			churnSink = churnSink[:0]
		}
		if time.Since(lastGC) > 100*time.Millisecond {
			runtime.GC()
			lastGC = time.Now()
		}
	}
	churnSink = nil
	runtime.GC()
}
