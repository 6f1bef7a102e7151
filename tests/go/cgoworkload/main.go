// cgoworkload is the cgo-linked target of the test matrix: built with CGO_ENABLED=1, it is
// linked by gcc against libc and calls a tiny C function (cgo.go) from every call of its
// loop-defer function and from every goroutine. Otherwise it does a small, known amount of the
// work deferprobe counts, like the workload, and prints its own ground truth as one JSON line
// on stdout (the workload's keys plus "cgo": whether the C calls were linked in).
//
// Built with CGO_ENABLED=0 (as `cargo xtask go-programs` builds every program) cgo.go is left
// out, the program makes no C calls, and it says "cgo":false.
//
//	-calls N -defers D   N calls of a function that registers D defers in a loop (heap defers)
//	-map-writes W        W string-key and W int-key map writes
//	-goroutines G        G goroutines that each register 2 loop defers and exit
//	-exit-code C         exit with status C
package main

import (
	"encoding/json"
	"flag"
	"os"
	"runtime"
	"strconv"
	"sync"
)

// cCall calls into C; set by cgo.go when the program is built with cgo.
var cCall func(int) int

var sink int

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
	HeapDefers      int    `json:"heap_defers"`
	StrMapWrites    int    `json:"str_map_writes"`
	IntMapWrites    int    `json:"int_map_writes"`
	GoroutinesEnded int    `json:"goroutines_ended"`
	Mallocs         uint64 `json:"mallocs"`
	GoVersion       string `json:"go_version"`
	Cgo             bool   `json:"cgo"`
}

func main() {
	calls := flag.Int("calls", 20, "calls of the loop-defer function")
	defers := flag.Int("defers", 25, "defers registered per call")
	mapWrites := flag.Int("map-writes", 500, "string-key (and int-key) map writes")
	goroutines := flag.Int("goroutines", 10, "goroutines started and ended")
	exitCode := flag.Int("exit-code", 0, "exit status")
	flag.Parse()

	var truth groundTruth
	m := make(map[string]int)
	for i := 0; i < *calls; i++ {
		loopDefers(*defers, m)
		truth.HeapDefers += *defers
	}
	strMap := make(map[string]int)
	intMap := make(map[int]int)
	for i := 0; i < *mapWrites; i++ {
		strMap["key-"+strconv.Itoa(i)] = i
		intMap[i] = i
	}
	truth.StrMapWrites = *mapWrites
	truth.IntMapWrites = *mapWrites

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
	truth.GoroutinesEnded = *goroutines

	var stats runtime.MemStats
	runtime.ReadMemStats(&stats)
	truth.Mallocs = stats.Mallocs
	truth.GoVersion = runtime.Version()
	truth.Cgo = cCall != nil
	out, _ := json.Marshal(truth)
	os.Stdout.Write(append(out, '\n'))
	os.Exit(*exitCode)
}
