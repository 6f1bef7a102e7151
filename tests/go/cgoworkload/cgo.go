// The C half of cgoworkload: only compiled when cgo is enabled.
package main

// static int twice(int x) { return 2 * x; }
import "C"

func init() {
	cCall = func(n int) int { return int(C.twice(C.int(n))) }
}
