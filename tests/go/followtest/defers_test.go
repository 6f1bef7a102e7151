// Package followtest is the test package `deferprobe run --follow -- go test` traces
// (tests/e2e/follow.rs): its test registers a known number of heap defers and prints its own
// accounting as one JSON line, in the ground-truth format of the other test programs.
package followtest

import (
	"encoding/json"
	"fmt"
	"testing"
)

var sink int

//go:noinline
func loopDefers(n int) {
	for i := 0; i < n; i++ {
		defer func() { sink += i }()
	}
}

func TestHeapDefers(t *testing.T) {
	const calls, defers = 30, 11
	truth := struct {
		HeapDefers int    `json:"heap_defers"`
		Calls      int    `json:"calls"`
		Site       string `json:"site"`
	}{Site: "followtest.loopDefers"}
	for i := 0; i < calls; i++ {
		loopDefers(defers)
		truth.HeapDefers += defers
		truth.Calls++
	}
	line, err := json.Marshal(truth)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Println(string(line))
}
