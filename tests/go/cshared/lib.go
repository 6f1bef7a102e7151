// cshared is a Go library built with -buildmode=c-shared and loaded by a C program
// (host/host.c): the Go runtime inside a .so of a process whose executable is not Go. Its
// exported functions make heap defer records (runtime.deferproc: a defer in a loop) and print
// their own ground truth as one JSON line each on stdout:
//
//	DeferLoop(calls, defers)  calls loopDefers(defers) `calls` times; every record runs when
//	                          loopDefers returns. Prints {"heap_defers": calls*defers, ...}
//	                          and the function, file and line of the defer statement.
//	Hold(n)                   starts a goroutine that defers n times in a loop (each closure
//	                          capturing a map) and blocks; returns once the records are
//	                          registered. Prints {"pending_defers": n, "goid": ..., ...}.
//	Release()                 lets the Hold goroutine return (its records run) and waits for it.
package main

import "C"

import (
	"encoding/json"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
)

var sink int

// site is where a defer statement is, from runtime.Caller(0) on the line just after it.
type site struct {
	Function string `json:"function"`
	File     string `json:"file"`
	Line     int    `json:"line"`
}

func deferAbove(pc uintptr, file string, line int, _ bool) site {
	return site{runtime.FuncForPC(pc).Name(), file, line - 1}
}

var loopSite site

//go:noinline
func loopDefers(n int) {
	m := map[string]int{}
	for i := 0; i < n; i++ {
		defer func() { sink += len(m) }()
		loopSite = deferAbove(runtime.Caller(0))
		m[strconv.Itoa(i)] = i
	}
}

//export DeferLoop
func DeferLoop(calls, defers C.int) {
	for i := 0; i < int(calls); i++ {
		loopDefers(int(defers))
	}
	print(map[string]any{
		"heap_defers": int(calls) * int(defers),
		"go_version":  runtime.Version(),
		"site":        loopSite,
	})
}

var (
	holdSite site
	release  = make(chan struct{})
	released = make(chan struct{})
)

//go:noinline
func holdDefers(n int, ready chan<- int64) {
	for i := 0; i < n; i++ {
		m := map[string]int{"k": i}
		defer func() { sink += len(m) }()
		holdSite = deferAbove(runtime.Caller(0))
	}
	ready <- goid()
	<-release
}

//export Hold
func Hold(n C.int) {
	ready := make(chan int64)
	go func() {
		holdDefers(int(n), ready)
		close(released)
	}()
	print(map[string]any{
		"pending_defers": int(n),
		"goid":           <-ready,
		"go_version":     runtime.Version(),
		"site":           holdSite,
	})
}

//export Release
func Release() {
	close(release)
	<-released
}

// goid is the current goroutine's id, from its stack trace header ("goroutine 7 [running]:").
func goid() int64 {
	buf := make([]byte, 64)
	buf = buf[:runtime.Stack(buf, false)]
	field := strings.Fields(string(buf))[1]
	id, _ := strconv.ParseInt(field, 10, 64)
	return id
}

func print(truth map[string]any) {
	line, err := json.Marshal(truth)
	if err != nil {
		panic(err)
	}
	fmt.Fprintf(os.Stdout, "%s\n", line)
}

func main() {}
