// Package protocol is how the Go test programs talk to the tests that trace them: "ready" on
// stdout and a line on stdin before working, the program's own ground truth as one JSON line
// on stdout, and staying alive until stdin closes, so the tracer can look at it meanwhile.
package protocol

import (
	"bufio"
	"encoding/json"
	"os"
)

// Counts is the ground truth the workload-like programs report; the tests read these keys.
type Counts struct {
	HeapDefers      int    `json:"heap_defers"`
	StrMapWrites    int    `json:"str_map_writes"`
	IntMapWrites    int    `json:"int_map_writes"`
	GoroutinesEnded int    `json:"goroutines_ended"`
	Mallocs         uint64 `json:"mallocs"`
	GoVersion       string `json:"go_version"`
}

// Stdin is the test's end of the conversation.
type Stdin struct{ reader *bufio.Reader }

func NewStdin() *Stdin { return &Stdin{bufio.NewReader(os.Stdin)} }

// WaitForGo prints "ready" and waits for a line; exits with status 3 if stdin closes first.
func (s *Stdin) WaitForGo() {
	os.Stdout.WriteString("ready\n")
	if !s.WaitForLine() {
		os.Exit(3)
	}
}

// WaitForLine waits for a line on stdin; false if stdin closed instead.
func (s *Stdin) WaitForLine() bool {
	_, err := s.reader.ReadString('\n')
	return err == nil
}

// HoldUntilEOF returns when stdin closes.
func (s *Stdin) HoldUntilEOF() {
	for s.WaitForLine() {
	}
}

// Print writes v as one JSON line on stdout.
func Print(v any) {
	out, _ := json.Marshal(v)
	os.Stdout.Write(append(out, '\n'))
}
