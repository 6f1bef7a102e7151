// recursion forces stack growth inside runtime.deferproc: G goroutines each recurse D levels
// deep, and every level registers one loop (heap) defer before recursing. It prints its own
// ground truth as one JSON line on stdout (the same keys as the workload's).
//
// Why the growth happens inside deferproc: descend's frame is small (no 128-byte stack-check
// slack) but bigger than deferproc's, and at each level descend calls deferproc before it
// calls itself, at the same stack pointer. So each level's call of deferproc reaches deeper
// than anything the previous level did (including deferproc's own callee, newdefer), and when
// the goroutine's stack runs out the first stack check that fails is deferproc's: deferproc
// calls morestack, the stack is copied to a bigger one, and deferproc starts again from its
// first instruction. (Without the pad array, newdefer's check failed first and deferproc was
// never re-entered.) A uprobe on deferproc's entry sees that call twice; deferprobe's probe,
// on the CALL of deferproc in descend, sees it once. Every goroutine starts with an 8 KiB
// stack, so each one grows (and re-enters deferproc) several times on the way down.
//
//	-depth D        recursion depth per goroutine
//	-goroutines G   goroutines, run one after the other
//	-exit-code C    exit with status C
package main

import (
	"deferprobe.test/programs/internal/protocol"
	"flag"
	"os"
	"runtime"
)

var ran int

// descend registers one heap defer (a defer inside a loop) per level and returns the levels
// below it. pad, read after the recursive call (it adds 0), keeps 64 bytes in descend's frame.
// The deferred closure captures nothing, so registering it allocates nothing that could grow
// the stack first.
//
//go:noinline
func descend(depth int) int {
	var pad [8]int
	for i := range pad {
		pad[i] = depth + i
	}
	for i := 0; i < 1; i++ {
		defer func() { ran++ }()
	}
	if depth == 0 {
		return 0
	}
	return descend(depth-1) + 1 + pad[depth%len(pad)] - depth - depth%len(pad)
}

type groundTruth struct {
	protocol.Counts
	DefersRan int `json:"defers_ran"`
}

func main() {
	depth := flag.Int("depth", 400, "recursion depth per goroutine")
	goroutines := flag.Int("goroutines", 20, "goroutines, one after the other")
	exitCode := flag.Int("exit-code", 0, "exit status")
	flag.Parse()

	var truth groundTruth
	for g := 0; g < *goroutines; g++ {
		done := make(chan int)
		go func() { done <- descend(*depth) }()
		levels := <-done + 1
		truth.HeapDefers += levels
	}
	truth.GoroutinesEnded = *goroutines
	truth.DefersRan = ran

	var stats runtime.MemStats
	runtime.ReadMemStats(&stats)
	truth.Mallocs = stats.Mallocs
	truth.GoVersion = runtime.Version()
	protocol.Print(truth)
	os.Exit(*exitCode)
}
