// The C half of the workload: only compiled when cgo is enabled (CGO_ENABLED=1, the `cgo`
// variant of the test matrix), making it a gcc-linked binary that calls into C.
package main

// static int twice(int x) { return 2 * x; }
import "C"

func init() {
	cCall = func(n int) int { return int(C.twice(C.int(n))) }
}
