//go:build go1.23

// The build constraint also makes this file's language version go1.23, so it may range over a
// function although go.mod says go 1.21.

package main

import (
	"iter"
	"runtime"
)

func init() { scenarios = append(scenarios, holdRange) }

// count yields 0, 1, ..., n-1.
func count(n int) iter.Seq[int] {
	return func(yield func(int) bool) {
		for i := 0; i < n; i++ {
			if !yield(i) {
				return
			}
		}
	}
}

// holdRange defers in the body of a range-over-func loop. The body is a closure the compiler
// makes (main.holdRange-range1), whose defers go on holdRange's frame (runtime.deferprocat)
// and stay pending while holdRange blocks after the loop.
//
//go:noinline
func holdRange(n int, sites *[]site, ready chan<- struct{}) {
	s := newSite("rangefunc", "map")
	for i := range count(n) {
		m := stringMap(i)
		defer func() { sink += len(m) }()
		s.deferAbove(runtime.Caller(0))
		s.record(m)
	}
	*sites = []site{s}
	ready <- struct{}{}
	<-held
}
