// stress puts the Go runtime's defer machinery under the conditions a tracer must survive, and
// checks itself: every goroutine accounts for each heap defer it registers and each one that
// runs, and the program fails (exit 1, "self_check" != "ok") if any record went missing or ran
// twice. It prints its ground truth as one JSON line (the workload's keys, plus its own).
//
// -goroutines G goroutines start together and wait at a gate, so all G are alive at once. Each
// then recurses -depth levels; every level registers one loop (heap) defer and keeps a 256-byte
// pad in its frame, so the 8 KiB starting stack is grown and copied several times on the way
// down (checked at the bottom: a local of the goroutine's first frame has moved, or the stack
// is used deeper than goroutines start with). Halfway down a guard frame defers a recover. At
// the bottom, goroutine i:
//   - i%3 == 0 returns normally: every record runs through deferreturn;
//   - i%3 == 1 panics: the records below the guard run during the panic, the guard recovers,
//     and the frames above return normally;
//   - i%3 == 2 calls runtime.Goexit: every record runs during Goexit and the goroutine ends.
//
// -burst N then registers N loop defers in one call, as fast as the runtime can (floods the
// tracer's ring buffer on purpose).
//
//	-wait        print "ready" and wait for a line on stdin before working; after printing the
//	             result, wait for stdin to close before exiting
//	-rounds R    run the goroutine phase R times
//	-linger D    after printing the result, sleep D before exiting
//	-exit-code C exit with status C (when the self-check passes)
package main

import (
	"deferprobe.test/programs/internal/protocol"
	"flag"
	"fmt"
	"os"
	"runtime"
	"runtime/metrics"
	"sync"
	"time"
	"unsafe"
)

// state is one goroutine's own accounting; only that goroutine touches it.
type state struct {
	registered int
	ran        int
	recovered  int
	goexited   bool
}

type stressPanic struct{}

// descend registers one heap defer per level and recurses. pad keeps 256 bytes in the frame.
//
//go:noinline
func descend(st *state, depth, guardAt int, bottom func()) int {
	var pad [32]int
	for i := range pad {
		pad[i] = depth + i
	}
	for i := 0; i < 1; i++ {
		st.registered++
		defer func() { st.ran++ }()
	}
	if depth == guardAt {
		return guard(st, depth, bottom) + pad[depth%len(pad)] - depth - depth%len(pad)
	}
	if depth == 0 {
		bottom()
		return 0
	}
	return descend(st, depth-1, guardAt, bottom) + 1 + pad[depth%len(pad)] - depth - depth%len(pad)
}

// startingStackSize is the stack goroutines start with now (Go 1.19+ sizes it from the
// stacks the last GC saw), from runtime/metrics since Go 1.21; before, unknown (the largest
// uintptr, so that only an address tells a copy).
func startingStackSize() uintptr {
	sample := []metrics.Sample{{Name: "/gc/stack/starting-size:bytes"}}
	metrics.Read(sample)
	if sample[0].Value.Kind() != metrics.KindUint64 {
		return ^uintptr(0)
	}
	return uintptr(sample[0].Value.Uint64())
}

// guard recovers a stressPanic from below and lets the frames above return normally.
//
//go:noinline
func guard(st *state, depth int, bottom func()) (levels int) {
	defer func() {
		if r := recover(); r != nil {
			if _, ok := r.(stressPanic); !ok {
				panic(r)
			}
			st.recovered++
			levels = -1
		}
	}()
	return descend(st, depth-1, -1, bottom) + 1
}

//go:noinline
func burst(n int, ran *int) {
	for i := 0; i < n; i++ {
		defer func() { *ran++ }()
	}
}

type groundTruth struct {
	protocol.Counts
	DefersRan     int    `json:"defers_ran"`
	Recovered     int    `json:"recovered"`
	Goexits       int    `json:"goexits"`
	StacksMoved   int    `json:"stacks_moved"`
	MaxConcurrent int    `json:"max_concurrent"`
	SelfCheck     string `json:"self_check"`
}

func main() {
	goroutines := flag.Int("goroutines", 66, "goroutines alive at once")
	depth := flag.Int("depth", 64, "recursion depth per goroutine")
	rounds := flag.Int("rounds", 1, "times the goroutine phase runs")
	burstN := flag.Int("burst", 0, "loop defers registered in one call at the end")
	wait := flag.Bool("wait", false, "wait for stdin before working and before exiting")
	exitCode := flag.Int("exit-code", 0, "exit status when the self-check passes")
	linger := flag.Duration("linger", 0, "sleep this long after printing the result")
	flag.Parse()

	stdin := protocol.NewStdin()
	if *wait {
		stdin.WaitForGo()
	}

	var truth groundTruth
	var problems []string
	for round := 0; round < *rounds; round++ {
		states := make([]state, *goroutines)
		moved := make([]bool, *goroutines)
		starting := startingStackSize()
		var started, done sync.WaitGroup
		gate := make(chan struct{})
		started.Add(*goroutines)
		done.Add(*goroutines)
		for i := 0; i < *goroutines; i++ {
			go func(i int) {
				st := &states[i]
				var anchor int
				before := uintptr(unsafe.Pointer(&anchor))
				defer done.Done()
				started.Done()
				<-gate
				// Looked at the bottom, where the stack is deepest: once the frames returned,
				// a GC may shrink the stack back into the very block it started in. Even
				// there the grown stack can end where the first one did (its block freed
				// and reused), so a stack used deeper than goroutines start with counts too.
				bottom := func() {
					var deep int
					used := before - uintptr(unsafe.Pointer(&deep))
					moved[i] = uintptr(unsafe.Pointer(&anchor)) != before || used > starting
					switch i % 3 {
					case 1:
						panic(stressPanic{})
					case 2:
						st.goexited = true
						runtime.Goexit()
					}
				}
				descend(st, *depth, *depth/2, bottom)
			}(i)
		}
		started.Wait() // every goroutine is alive and parked at the gate
		if *goroutines > truth.MaxConcurrent {
			truth.MaxConcurrent = *goroutines
		}
		close(gate)
		done.Wait()

		for i := range states {
			st := &states[i]
			wantRecovered := 0
			if i%3 == 1 {
				wantRecovered = 1
			}
			if st.registered != *depth+1 || st.ran != st.registered || st.recovered != wantRecovered ||
				st.goexited != (i%3 == 2) {
				problems = append(problems, fmt.Sprintf("goroutine %d: %+v", i, *st))
			}
			if moved[i] {
				truth.StacksMoved++
			}
			truth.HeapDefers += st.registered
			truth.DefersRan += st.ran
			truth.Recovered += st.recovered
			if st.goexited {
				truth.Goexits++
			}
		}
		truth.GoroutinesEnded += *goroutines
	}
	if *rounds > 0 && truth.StacksMoved < *goroutines {
		problems = append(problems, fmt.Sprintf("only %d stacks were copied", truth.StacksMoved))
	}

	if *burstN > 0 {
		ran := 0
		burst(*burstN, &ran)
		if ran != *burstN {
			problems = append(problems, fmt.Sprintf("burst: %d of %d defers ran", ran, *burstN))
		}
		truth.HeapDefers += *burstN
		truth.DefersRan += ran
	}

	truth.SelfCheck = "ok"
	if len(problems) > 0 {
		truth.SelfCheck = fmt.Sprint(problems)
	}
	var stats runtime.MemStats
	runtime.ReadMemStats(&stats)
	truth.Mallocs = stats.Mallocs
	truth.GoVersion = runtime.Version()
	protocol.Print(truth)
	if *wait {
		stdin.WaitForLine() // until stdin closes (or another line)
	}
	time.Sleep(*linger)
	if len(problems) > 0 {
		os.Exit(1)
	}
	os.Exit(*exitCode)
}
