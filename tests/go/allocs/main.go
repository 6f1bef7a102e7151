// allocs makes a fixed, deterministic set of heap allocations of every size class path the
// Go 1.27 allocator has: tiny (noscan, < 16 bytes), small noscan and small scan objects of
// 1–80 bytes (the sizes Go 1.27's size-specialized malloc serves directly), larger small
// objects, and large (> 32 KiB) objects, through new(T), make([]T, n) with constant and
// dynamic n, closures and string concatenation. It prints its own ground truth as one JSON
// line on stdout (the same keys as the workload's, plus what it counted around its loop).
//
// The garbage collector is off (debug.SetGCPercent(-1), and the program stays far below the
// first GC trigger anyway), so the runtime makes no allocations of its own during the loop:
// the runtime's count of allocations in the loop equals the allocations the loop makes.
//
//	-rounds R     rounds of the allocation loop
//	-exit-code C  exit with status C
//	-memprofile-rate N  set runtime.MemProfileRate to N first (0: leave it), and add to the
//	              ground truth the allocations the runtime sampled for its memory profile
//	              (profile_samples, profile_sampled_bytes: runtime.MemProfile after two GCs,
//	              every profilealloc call since the process started; profile_estimated_bytes:
//	              what pprof unsamples them to); then stay alive 300 ms so that a tracer
//	              reads the rate in force
package main

import (
	"flag"
	"math"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"time"
)

type (
	scan8  struct{ p *int }
	scan24 struct {
		p    *int
		x, y int
	}
	scan48 struct {
		p *int
		x [5]int
	}
	scan80 struct {
		p *int
		x [9]int
	}
)

var (
	sinkBytes  [][]byte
	sinkAny    []any
	sinkFuncs  []func() int
	sinkString []string
)

// allocationsPerRound is how many heap allocations one call of round makes.
const allocationsPerRound = 18

//go:noinline
func round(i int) {
	// Tiny noscan (< 16 bytes, combined into 16-byte blocks).
	sinkAny = append(sinkAny, new([1]byte), new([8]byte), new([15]byte))
	// Small noscan, 16–80 bytes.
	sinkAny = append(sinkAny, new([16]byte), new([24]byte), new([48]byte), new([80]byte))
	// Small scan, 8–80 bytes.
	sinkAny = append(sinkAny, &scan8{}, &scan24{}, &scan48{}, &scan80{})
	// Above 80 bytes: small and large.
	sinkAny = append(sinkAny, new([96]byte), new([40000]byte))
	// Sizes only known at run time (makeslice, then mallocgc).
	sinkBytes = append(sinkBytes, make([]byte, 1+i%64), make([]byte, 200+i%8))
	// A closure capturing a variable.
	sinkFuncs = append(sinkFuncs, func() int { return i })
	// A string built at run time.
	sinkString = append(sinkString, "round-"+strconv.Itoa(1000+i*1000003))
}

func main() {
	rounds := flag.Int("rounds", 200, "rounds of the allocation loop")
	exitCode := flag.Int("exit-code", 0, "exit status")
	memProfileRate := flag.Int("memprofile-rate", 0, "runtime.MemProfileRate to set (0: leave it)")
	flag.Parse()
	if *memProfileRate > 0 {
		runtime.MemProfileRate = *memProfileRate
	}
	selfCheck := os.Getenv("ALLOCS_SELF_CHECK") != ""
	debug.SetGCPercent(-1)

	// Room for every round and for the output up front: the appends below don't allocate.
	sinkAny = make([]any, 0, 13**rounds)
	sinkBytes = make([][]byte, 0, 2**rounds)
	sinkFuncs = make([]func() int, 0, *rounds)
	sinkString = make([]string, 0, *rounds)
	out := make([]byte, 0, 512)

	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for i := 0; i < *rounds; i++ {
		round(i)
	}
	runtime.ReadMemStats(&after)

	// The ground truth is written without allocating (no encoding/json), so "mallocs" counts
	// every allocation the process makes from its first instruction to its exit.
	field := func(name string, value uint64) {
		out = append(out, ',', '"')
		out = append(out, name...)
		out = append(out, '"', ':')
		out = strconv.AppendUint(out, value, 10)
	}
	out = append(out, `{"heap_defers":0`...)
	field("str_map_writes", 0)
	field("int_map_writes", 0)
	field("goroutines_ended", 0)
	field("mallocs", after.Mallocs)
	field("loop_mallocs", after.Mallocs-before.Mallocs)
	field("loop_expected", uint64(allocationsPerRound**rounds))
	if *memProfileRate > 0 {
		// Two cycles publish every sample taken so far.
		runtime.GC()
		runtime.GC()
		n, _ := runtime.MemProfile(nil, true)
		records := make([]runtime.MemProfileRecord, n+64)
		n, _ = runtime.MemProfile(records, true)
		var samples, sampledBytes int64
		// What pprof makes of the profile (its scaleHeapSample, per record).
		var estimatedBytes float64
		rate := float64(runtime.MemProfileRate)
		for _, r := range records[:n] {
			samples += r.AllocObjects
			sampledBytes += r.AllocBytes
			if r.AllocObjects > 0 {
				avg := float64(r.AllocBytes) / float64(r.AllocObjects)
				estimatedBytes += float64(r.AllocBytes) / (1 - math.Exp(-avg/rate))
			}
		}
		field("memprofile_rate", uint64(runtime.MemProfileRate))
		field("profile_samples", uint64(samples))
		field("profile_sampled_bytes", uint64(sampledBytes))
		field("profile_estimated_bytes", uint64(estimatedBytes))
		field("total_alloc", after.TotalAlloc)
	}
	out = append(out, `,"go_version":"`...)
	out = append(out, runtime.Version()...)
	out = append(out, "\"}\n"...)
	os.Stdout.Write(out)
	if selfCheck {
		runtime.ReadMemStats(&before)
		os.Stdout.WriteString("allocations after the ground truth: " + strconv.FormatUint(before.Mallocs-after.Mallocs, 10) + "\n")
	}
	if *memProfileRate > 0 {
		time.Sleep(300 * time.Millisecond)
	}
	os.Exit(*exitCode)
}
