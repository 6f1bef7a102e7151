// benchhits is the per-hit cost benchmark of `cargo xtask bench` (BENCHMARKS.md). It calls one
// small function N times and times the loop itself, so that the cost a tracer adds per call
// can be read off against an untraced run of the same binary.
//
// Workloads (each call makes exactly 10 hits of the probed runtime function, plus one
// deferreturn for the defer workload):
//
//	defer  10 heap defers (a defer inside a loop: runtime.deferproc) of a closure that
//	       captures nothing, so no allocation; one runtime.deferreturn
//	map    10 writes (runtime.mapassign_fast64) to existing keys of a pre-sized map: no
//	       growth, no allocation
//	alloc  10 heap allocations of 64-byte pointer-free objects (runtime.mallocgc, or on Go
//	       1.27 its size-specialized entry), garbage collector off
//	capture  10 heap defers of a closure capturing a map (the table of the map workload, which
//	       it wrote first) by value: runtime.deferproc with capture detection, plus the
//	       closures' allocations; one runtime.deferreturn
//	stack  9 stack defers (more than 8 defers: not open-coded, so runtime.deferprocStack, whose
//	       first instruction is PUSHQ BP) and one runtime.deferreturn. A reference for what a
//	       uprobe costs on an instruction the kernel emulates rather than single-steps.
//
// Flags: -workload W, -n N (timed calls), -warmup W (untimed calls first), -linger D (sleep
// after printing the result, so a benchmark can read the tracer's kernel statistics while the
// probes are still attached). Output: one JSON line.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"runtime/debug"
	"time"
)

var sink [10]*[64]byte

//go:noinline
func noop() {}

//go:noinline
func deferTen() {
	for i := 0; i < 10; i++ {
		defer noop()
	}
}

var sinkLen int

//go:noinline
func deferCaptureTen(m map[int64]int64) {
	for i := 0; i < 10; i++ {
		defer func() { sinkLen += len(m) }()
	}
}

//go:noinline
func stackNine() {
	defer noop()
	defer noop()
	defer noop()
	defer noop()
	defer noop()
	defer noop()
	defer noop()
	defer noop()
	defer noop()
}

var table = make(map[int64]int64, 64)

//go:noinline
func writeTen(base int64) {
	for i := int64(0); i < 10; i++ {
		table[i] = base + i
	}
}

//go:noinline
func allocTen() {
	for i := 0; i < 10; i++ {
		sink[i] = new([64]byte)
	}
}

func main() {
	workload := flag.String("workload", "defer", "defer | capture | map | alloc | stack")
	n := flag.Int("n", 2000, "timed calls")
	warmup := flag.Int("warmup", 100, "untimed calls before the timed ones")
	linger := flag.Duration("linger", 0, "sleep after printing the result")
	flag.Parse()
	debug.SetGCPercent(-1)
	for i := int64(0); i < 10; i++ {
		table[i] = i
	}
	var call func(int64)
	switch *workload {
	case "defer":
		call = func(int64) { deferTen() }
	case "capture":
		call = func(int64) { deferCaptureTen(table) }
	case "map":
		call = writeTen
	case "alloc":
		call = func(int64) { allocTen() }
	case "stack":
		call = func(int64) { stackNine() }
	default:
		fmt.Fprintf(os.Stderr, "unknown workload %q\n", *workload)
		os.Exit(2)
	}
	for i := 0; i < *warmup; i++ {
		call(int64(i))
	}
	start := time.Now()
	for i := 0; i < *n; i++ {
		call(int64(i))
	}
	elapsed := time.Since(start)
	out, _ := json.Marshal(map[string]any{
		"workload":    *workload,
		"calls":       *n,
		"elapsed_ns":  elapsed.Nanoseconds(),
		"ns_per_call": float64(elapsed.Nanoseconds()) / float64(*n),
	})
	fmt.Println(string(out))
	os.Stdout.Sync()
	time.Sleep(*linger)
}
