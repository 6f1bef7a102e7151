// benchphases is the estimate-accuracy workload of `cargo xtask bench` (BENCHMARKS.md, issue
// 13): map writes and heap allocations in phases, so that a sampling tracer's estimates can be
// checked against exact counts. An optional start-up burst (as fast as it goes), then a steady
// phase paced in 10 ms batches, then it prints what it did as one JSON line and exits.
//
// Flags: -burst N (map writes and allocations, N of each, before the steady phase; 0: none),
// -rate R (of each per second in the steady phase), -secs S (its length).
//
// Each map write is one runtime.mapassign_fast64 to an existing key of a pre-sized map (no
// growth, no allocation); each allocation one 64-byte pointer-free object (runtime.mallocgc,
// or its size-specialized entry), the garbage collector off.
package main

import (
	"encoding/json"
	"flag"
	"os"
	"runtime/debug"
	"time"
)

var (
	table = make(map[int64]int64, 64)
	sink  [16]*[64]byte
)

//go:noinline
func write(i int64) { table[i&31] = i }

//go:noinline
func alloc(i int) { sink[i&15] = new([64]byte) }

func both(from, n int) {
	for i := from; i < from+n; i++ {
		write(int64(i))
		alloc(i)
	}
}

func main() {
	burst := flag.Int("burst", 0, "map writes and allocations of the start-up burst, of each")
	rate := flag.Int("rate", 20000, "map writes and allocations per second in the steady phase, of each")
	secs := flag.Float64("secs", 10, "length of the steady phase, in seconds")
	flag.Parse()
	debug.SetGCPercent(-1)
	for i := int64(0); i < 32; i++ {
		table[i] = 0
	}

	start := time.Now()
	both(0, *burst)
	burstSecs := time.Since(start).Seconds()

	const batch = 10 * time.Millisecond
	perBatch := *rate / 100
	steady := 0
	begin := time.Now()
	for next := begin; time.Since(begin).Seconds() < *secs; {
		both(*burst+steady, perBatch)
		steady += perBatch
		next = next.Add(batch)
		time.Sleep(time.Until(next))
	}
	total := *burst + steady
	json.NewEncoder(os.Stdout).Encode(map[string]any{
		"map_writes":  total,
		"allocations": total,
		"burst":       *burst,
		"burst_secs":  burstSecs,
		"steady":      steady,
		"steady_secs": time.Since(begin).Seconds(),
	})
}
